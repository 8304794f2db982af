"""Same-process A/B of jaxreid's one-network train step under settings of `jaxreid.layers`.

Each variant sets module-level switches of `jaxreid.layers` before its step is traced and
compiled; then the compiled steps run alternately (A, B, A, B, ...), so a busy or drifting
machine slows every variant alike. This is how the CPU layer choices in
experiments/benchmarks/results_benchmark.md were measured.

Usage:
  python experiments/benchmarks/ab_cpu_step.py --backbone=osnet_x0_25 --size=256x128x16 --pairs=5 \
      --variants='DEPTHWISE_DENSE_MAX_CHANNELS=0;DEPTHWISE_DENSE_MAX_CHANNELS=32'
  python experiments/benchmarks/ab_cpu_step.py --mode=eval --size=256x128x32 ...  # the feature pass
A variant is `NAME=VALUE[,NAME=VALUE...]` with NAME a `jaxreid.layers` constant (an int) or
`pointwise_impl` (auto | xla | dot); an empty variant is the default. Prints each variant's step
times, their median, and the largest difference of its loss (train) or features (eval) from the
first variant's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def apply_settings(variant: str) -> None:
  """Sets `jaxreid.layers` switches for the next tracing; unknown names are an error."""
  from jaxreid import layers

  for item in filter(None, variant.split(',')):
    name, _, value = item.partition('=')
    if name == 'pointwise_impl':
      layers.conv_general.__kwdefaults__['pointwise_impl'] = value
    elif name.isupper() and isinstance(getattr(layers, name, None), int):
      setattr(layers, name, int(value))
    else:
      raise SystemExit(f'unknown setting {name!r}: a jaxreid.layers int constant or pointwise_impl')


def build(mode: str, backbone: str, h: int, w: int, b: int, method: str):
  """A compiled program and its first result: the train step (state donated) or the eval
  forward."""
  import jax
  import numpy as np

  from experiments.benchmarks import profile_cpu_step
  from jaxreid import models
  from jaxreid import numpy_init

  if mode == 'train':
    step_fn, (state, data, idx, _), _, _ = profile_cpu_step.jax_step_parts(
        backbone, h, w, b, method
    )
    compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(state, data, idx, idx).compile()
    state, metrics = compiled(state, data, idx, idx)
    box = {'state': state}

    def run():
      box['state'], m = compiled(box['state'], data, idx, idx)
      return jax.block_until_ready(m['loss/total'])

    return run, np.float32(metrics['loss/total'])
  model = models.create_model(dict(backbone=backbone, depth=50, width=64, num_classes=512))
  variables = numpy_init.init_variables(model, 0)
  x = np.random.default_rng(0).standard_normal((b, h, w, 3)).astype(np.float32)
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
  run = lambda: jax.block_until_ready(compiled(variables, x))
  return run, np.asarray(jax.tree_util.tree_leaves(run())[0])


def current_settings() -> str:
  """The switches' present values as a variant, to restore them between variants."""
  from jaxreid import layers

  values = {'pointwise_impl': layers.conv_general.__kwdefaults__['pointwise_impl']}
  values.update({k: v for k, v in vars(layers).items() if k.isupper() and type(v) is int})
  return ','.join(f'{k}={v}' for k, v in values.items())


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--backbone', default='osnet_x0_25')
  p.add_argument('--size', default='256x128x16', help='HEIGHTxWIDTHxBATCH')
  p.add_argument('--mode', default='train', choices=('train', 'eval'))
  p.add_argument('--method', default='cluster_baseline', help='the train step of this method')
  p.add_argument('--pairs', type=int, default=5, help='alternating rounds')
  p.add_argument('--variants', default=';', help="';'-separated variants (see the docstring)")
  args = p.parse_args()
  import numpy as np

  defaults = current_settings()

  h, w, b = (int(v) for v in args.size.split('x'))
  variants = args.variants.split(';')
  programs = []
  for v in variants:
    apply_settings(v)
    t = time.perf_counter()
    programs.append(build(args.mode, args.backbone, h, w, b, args.method))
    print(
        f'[{v or "default"}] compiled and ran once in {time.perf_counter() - t:.0f} s', flush=True
    )
    apply_settings(defaults)
  times = [[] for _ in variants]
  for _ in range(args.pairs):
    for i, (run, _) in enumerate(programs):
      t = time.perf_counter()
      run()
      times[i].append(1e3 * (time.perf_counter() - t))
  print(
      f'\n{args.backbone} {args.size} {args.mode} ({args.method}), {args.pairs} alternating rounds (ms)\n'
  )
  print('| variant | times | median | max diff vs first |')
  print('|---|---|---|---|')
  for v, ts, (_, out) in zip(variants, times, programs):
    diff = float(np.max(np.abs(out - programs[0][1])))
    print(
        f'| {v or "default"} | {", ".join(f"{t:.0f}" for t in ts)} | '
        f'{statistics.median(ts):.0f} | {diff:.1e} |'
    )


if __name__ == '__main__':
  main()
