"""Throughput of the input pipeline: host decode (PIL decode + bicubic resize) and the jitted
on-device augmentation (flip, pad + crop, normalise, random erasing), at 64x32 and 256x128.

    python experiments/benchmarks/bench_input_pipeline.py [--images DIR] [--num-images N] \
        [--batch-size B]

Images default to ../shared/data/cuhk03_detected/bounding_box_train when present, else the
synthetic world (generated into the cache on first use). Augmentation timings are warm (compile
excluded) and wait for the device (block_until_ready).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, uninstalled
from jaxreid import input_pipeline as ip  # noqa: E402

SIZES = ((64, 32), (256, 128))


def _image_paths(args) -> tuple[list[str], str]:
  if args.images:
    d = Path(args.images)
  else:
    d = (
        Path(__file__).resolve().parents[2].parent
        / 'shared'
        / 'data'
        / 'cuhk03_detected'
        / 'bounding_box_train'
    )
  if d.is_dir():
    paths = sorted(str(p) for p in d.iterdir() if p.suffix.lower() in ('.jpg', '.png'))
    return paths[: args.num_images], str(d)
  from jaxreid.data import load_dataset

  ds = load_dataset('synthetic_a')
  return list(ds.train.paths[: args.num_images]), ds.root


def bench_decode(paths, h, w, threads, repeats=2):
  best = float('inf')
  for _ in range(repeats):  # the first pass also warms the OS file cache
    t = time.perf_counter()
    ip.decode_images(paths, h, w, progress=False, num_threads=threads)
    best = min(best, time.perf_counter() - t)
  return len(paths) / best


def bench_augment(h, w, batch, repeats):
  x = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), np.uint8))
  f = jax.jit(ip.augment, static_argnames=('pad', 'flip', 'erasing_prob'))
  keys = [jax.random.key(i) for i in range(repeats + 1)]  # made before timing
  f(keys[0], x).block_until_ready()  # compile
  t = time.perf_counter()
  for k in keys[1:]:
    out = f(k, x)
  out.block_until_ready()
  return batch * repeats / (time.perf_counter() - t)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--images', default=None)
  ap.add_argument('--num-images', type=int, default=3000)
  ap.add_argument('--batch-size', type=int, default=64)
  ap.add_argument('--repeats', type=int, default=50)
  args = ap.parse_args()
  paths, src = _image_paths(args)
  dev = jax.devices()[0]
  print(
      f'jax {jax.__version__} on {dev.platform} ({dev.device_kind}); '
      f'host {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores'
  )
  print(f'decode: {len(paths)} images from {src}')
  threads_default = min(8, os.cpu_count() or 1)
  for h, w in SIZES:
    for threads in sorted({1, threads_default}):
      rate = bench_decode(paths, h, w, threads)
      print(f'decode+resize to {h}x{w}, {threads} thread(s): {rate:,.0f} images/s')
  for h, w in SIZES:
    rate = bench_augment(h, w, args.batch_size, args.repeats)
    print(f'augment {h}x{w}, batch {args.batch_size} (jit, warm): {rate:,.0f} images/s')


if __name__ == '__main__':
  main()
