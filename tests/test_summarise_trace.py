"""experiments/summarise_trace.py: device time per kernel kind from a Perfetto trace, checked on a
hand-written trace (known durations) and on a real jax.profiler trace of a matrix product."""

from __future__ import annotations

import gzip
import json
import os

import jax
import jax.numpy as jnp

from experiments import summarise_trace


def _write_trace(folder, events):
  os.makedirs(folder)
  with gzip.open(os.path.join(folder, 'perfetto_trace.json.gz'), 'wt') as f:
    json.dump({'traceEvents': events}, f)


def test_device_kernels_are_summed_by_kind_per_step(tmp_path):
  meta = lambda pid, name: {'ph': 'M', 'name': 'process_name', 'pid': pid, 'args': {'name': name}}
  kernel = lambda name, dur, pid=2: {'ph': 'X', 'name': name, 'pid': pid, 'tid': 1, 'dur': dur}
  _write_trace(
      str(tmp_path / 't' / 'plugins'),
      [
          meta(1, 'Host Threads'),
          meta(2, '/device:GPU:0'),
          kernel('PjitFunction(step)', 10_000, pid=1),  # host: not a kernel
          kernel('sm90_xmma_fprop_implicit_gemm_bf16', 3_000),
          kernel('sm90_xmma_fprop_implicit_gemm_bf16', 3_000),
          kernel('loop_multiply_fusion', 1_000),
          kernel('input_reduce_fusion_3', 1_500),
          kernel('copy_transpose_12', 500),
          kernel('mystery', 1_000),
      ],
  )
  events, what = summarise_trace.load_events(str(tmp_path / 't'))
  assert what == 'device kernels' and len(events) == 6
  text = summarise_trace.summarise(str(tmp_path / 't'), steps=2, top=3)
  # 10 ms of kernels over 2 steps; the convolution kernel is 6 ms of them, called once per step.
  assert '5.00 ms per step in kernels' in text
  assert '| convolution / matrix product | 3.00 | 60.0% |' in text
  assert '| reduction fusion | 0.75 | 15.0% |' in text
  assert '| elementwise fusion | 0.50 | 10.0% |' in text
  assert '| copy / transpose | 0.25 | 5.0% |' in text
  assert '| other | 0.50 | 10.0% |' in text
  assert (
      '| `sm90_xmma_fprop_implicit_gemm_bf16` | convolution / matrix product | 1.0 | 3.000 |'
      in text
  )


def test_a_real_cpu_trace_is_read(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    f(x).block_until_ready()
  events, what = summarise_trace.load_events(str(tmp_path))
  assert what == 'host thunks (CPU)'
  assert events and not any(e['name'].startswith('$') for e in events)  # no Python frames
  assert 'ms per step in kernels' in summarise_trace.summarise(str(tmp_path), steps=1, top=5)
