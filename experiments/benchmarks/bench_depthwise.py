"""Depthwise 3x3 convolution on this machine: jaxreid's forms (shifted multiply-adds, dense
block-diagonal convolution, 'auto') vs XLA's grouped convolution vs PyTorch, forward and forward +
backward, one layer alone (docs/reference.md section 8; in a network use ab_cpu_step.py).

Usage: python experiments/benchmarks/bench_depthwise.py [--shape=32,64,32,64] [--repeats=10]
Prints one line per implementation with the best time of `repeats` calls, and the largest
difference of each JAX result from the grouped convolution's.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxreid import layers


def best_ms(fn, *args, repeats=10):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1000 * min(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--shape', default='32,64,32,64', help='N,H,W,C (NHWC)')
  p.add_argument('--repeats', type=int, default=10)
  p.add_argument('--threads', type=int, default=2, help='PyTorch threads')
  args = p.parse_args()
  n, h, w, c = (int(v) for v in args.shape.split(','))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 1, c)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
  print(f'jax {jax.__version__} ({jax.default_backend()}), NHWC {n}x{h}x{w}x{c}, 3x3, groups {c}')
  results = {}
  for impl in ('xla', 'shifted', 'dense', 'auto'):
    fwd = jax.jit(lambda x, k, impl=impl: layers.depthwise_conv(x, k, 1, 1, impl))
    grad = jax.jit(
        jax.grad(
            lambda x, k, impl=impl: jnp.sum(layers.depthwise_conv(x, k, 1, 1, impl) * g),
            argnums=(0, 1),
        )
    )
    results[impl] = (fwd(x, k), grad(x, k))
    print(
        f'jaxreid {impl:8s} forward {best_ms(fwd, x, k, repeats=args.repeats):8.1f} ms   '
        f'forward + backward {best_ms(grad, x, k, repeats=args.repeats):8.1f} ms'
    )
  for impl in ('shifted', 'dense', 'auto'):
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(results[impl]), jax.tree.leaves(results['xla']))
    )
    print(f'largest |{impl} - xla| over output and both gradients: {diff:.2e}')
  try:
    import torch
  except ImportError:
    print('PyTorch: not installed')
    return
  torch.set_num_threads(args.threads)
  tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  tk = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy()).requires_grad_(True)
  tg = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())

  def t_fwd():
    with torch.no_grad():
      return torch.nn.functional.conv2d(tx, tk, padding=1, groups=c)

  def t_grad():
    y = torch.nn.functional.conv2d(tx, tk, padding=1, groups=c)
    return torch.autograd.grad((y * tg).sum(), (tx, tk))

  def best(fn):
    fn()
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return 1000 * min(times)

  print(
      f'PyTorch {torch.__version__} ({args.threads} threads) forward {best(t_fwd):8.1f} ms   '
      f'forward + backward {best(t_grad):8.1f} ms'
  )


if __name__ == '__main__':
  main()
