"""Measured ceilings of the accelerator (METHOD: measure the two ceilings once, then compare).

Prints the matrix-product rate for bfloat16, float32 at JAX's default precision (on NVIDIA GPUs
this may use TF32 tensor cores) and float32 at 'highest' precision, plus device-to-device copy
bandwidth. Random inputs, median of timed repeats after a warm-up.
Usage: python experiments/benchmarks/gpu_ceilings.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn, *args, repeats=10):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}')
  n = 8192 if jax.default_backend() != 'cpu' else 1024
  key = jax.random.PRNGKey(0)
  a32 = jax.random.normal(key, (n, n), jnp.float32)
  b32 = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
  flops = 2 * n**3
  for name, a, b, precision in [
      ('bfloat16', a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16), None),
      ('float32 default precision', a32, b32, None),
      ('float32 highest precision', a32, b32, jax.lax.Precision.HIGHEST),
  ]:
    fn = jax.jit(lambda x, y, p=precision: jnp.dot(x, y, precision=p))
    s = median_seconds(fn, a, b)
    print(f'matmul {n}^3 {name:28s} {flops / s / 1e12:8.1f} TFLOP/s')
  big = jax.random.normal(key, (256 * 2**20,), jnp.float32)  # 1 GiB
  copy = jax.jit(lambda x: x * 1.0001)
  s = median_seconds(copy, big)
  print(f'elementwise copy (read + write)     {2 * big.nbytes / s / 1e12:8.2f} TB/s')


if __name__ == '__main__':
  main()
