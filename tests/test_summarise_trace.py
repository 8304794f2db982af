"""experiments/benchmarks/summarise_trace.py: device time per kernel kind from a Perfetto trace,
checked on a hand-written trace (known durations) and on a real jax.profiler trace of a matrix
product; and experiments/benchmarks/profile_ops.py's attribution of HLO instructions to layer kinds
(hand-written HLO); and experiments/benchmarks/ab_cpu_step.py's settings."""

from __future__ import annotations

import gzip
import json
import os

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks import summarise_trace


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


_HLO = """HloModule jit_step

%fused_computation.1 (p0: f32[2,4,4,8], p1: f32[3,3,8,8]) -> f32[2,4,4,8] {
  %p0 = f32[2,4,4,8]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,8,8]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[2,4,4,8]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(step)/jvp(ReIDNet)/backbone/layer1_0/conv2/conv_general_dilated"}
}

%fused_computation.2 (p0: f32[8,4,4,2], p1: f32[2,4,4,8]) -> f32[8,3,3,8] {
  %p0 = f32[8,4,4,2]{3,2,1,0} parameter(0)
  %p1 = f32[2,4,4,8]{3,2,1,0} parameter(1)
  ROOT %convolution.2 = f32[8,3,3,8]{3,2,1,0} convolution(%p0, %p1), window={size=4x4 pad=1_1x1_1}, dim_labels=f01b_i01o->01bf
}

ENTRY %main.3 (x: f32[2,4,4,8], k: f32[3,3,8,8]) -> f32[2,4,4,8] {
  %x = f32[2,4,4,8]{3,2,1,0} parameter(0)
  %k = f32[3,3,8,8]{3,2,1,0} parameter(1)
  %ynn_fusion.1 = f32[2,4,4,8]{3,2,1,0} fusion(%x, %k), kind=kCustom, calls=%fused_computation.1
  %transpose_copy_fusion.3 = f32[8,4,4,2]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  %ynn_fusion.2 = f32[8,3,3,8]{3,2,1,0} fusion(%transpose_copy_fusion.3, %x), kind=kCustom, calls=%fused_computation.2
  %multiply.4 = f32[2,4,4,8]{3,2,1,0} multiply(%x, %x), metadata={op_name="jit(step)/transpose(jvp(ReIDNet))/backbone/layer1_0/bn2/mul"}
  %multiply.5 = f32[2,4,4,8]{3,2,1,0} multiply(%x, %x), metadata={op_name="jit(step)/jvp(ReIDNet)/backbone/conv2_0/conv2a/conv2/mul"}
  %add.6 = f32[3,3,8,8]{3,2,1,0} add(%k, %k), metadata={op_name="jit(step)/add"}
  ROOT %maximum.7 = f32[2,4,4,8]{3,2,1,0} maximum(%x, %x), metadata={op_name="jit(step)/transpose(jvp(ReIDNet))/backbone/jit(relu)/max"}
}
"""


def test_profile_ops_attributes_instructions_to_layer_kinds():
  from experiments.benchmarks import profile_ops

  index = profile_ops.hlo_index(_HLO)
  depthwise = ['backbone/conv2_0/conv2a/conv2']
  expected = {
      'ynn_fusion.1': 'conv / matmul (forward)',  # the metadata of the convolution in its body
      'ynn_fusion.2': 'conv / matmul (backward)',  # a kernel gradient: a convolution, no metadata
      'transpose_copy_fusion.3': 'layout copies / transposes',
      'multiply.4': 'BatchNorm (backward)',
      'multiply.5': 'depthwise conv (forward)',
      'add.6': 'optimizer, loss, other',
      'maximum.7': 'elementwise, pooling (backward)',
  }
  for name, kind in expected.items():
    assert profile_ops.attribute(name, index, depthwise)[0] == kind, name
  assert profile_ops.attribute('ynn_fusion.1', index, depthwise)[1].endswith(
      'conv2/conv_general_dilated'
  )


def test_ab_cpu_step_settings_reach_the_layers(monkeypatch):
  from experiments.benchmarks import ab_cpu_step
  from jaxreid import layers

  monkeypatch.setattr(layers, 'DEPTHWISE_DENSE_MAX_CHANNELS', layers.DEPTHWISE_DENSE_MAX_CHANNELS)
  monkeypatch.setitem(layers.conv_general.__kwdefaults__, 'pointwise_impl', 'auto')
  ab_cpu_step.apply_settings('DEPTHWISE_DENSE_MAX_CHANNELS=7,pointwise_impl=xla')
  assert layers.DEPTHWISE_DENSE_MAX_CHANNELS == 7
  assert layers.conv_general.__kwdefaults__['pointwise_impl'] == 'xla'
  ab_cpu_step.apply_settings('')  # the default variant changes nothing
  assert layers.DEPTHWISE_DENSE_MAX_CHANNELS == 7
  for bad in ('NO_SUCH_SWITCH=1', 'conv_init_fan_out=1'):
    with pytest.raises(SystemExit, match='unknown setting'):
      ab_cpu_step.apply_settings(bad)
