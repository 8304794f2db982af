"""Benchmark: measured speed of every method, for comparing accelerators.

  python -m jaxreid.benchmark --methods=pretrain,mmt --dtypes=float32,bfloat16 --steps=5
  (or jaxreid-benchmark ...)

For each method (pre-training, mean-teacher baseline, MMT, ABMT) and compute dtype it measures,
on whatever devices are present:
  - compile time of the training step (reported separately) and warm step time / images per
    second (the step driver the trainer uses, state donated, timed over `--steps` steps);
  - eval feature extraction images per second;
  - clustering time at the data set's size (K-means for MMT and the baselines, Jaccard + DBSCAN
    for ABMT) on random unit features with identity structure;
  - peak device memory (GPU / TPU memory stats; process max RSS on CPU);
  - model FLOPs utilisation against the device's peak where known.
It prints one table, writes JSON (`--out`), and projects the end-to-end time of the papers'
schedule (40 epochs x 400 iterations, clustering and evaluation every epoch) from the parts.

Defaults are CPU-sized (ResNet-18 width 16, 64x32, batch 32); the papers' setting is
`--depth=50 --width=64 --height=256 --img_width=128 --batch=64`.
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import NoReturn

from absl import app
from absl import flags

from jaxreid import host_memory  # defines --keep_host_memory
from jaxreid.tools import common

flags.DEFINE_list('methods', ['pretrain', 'mean_teacher', 'mmt', 'abmt'], 'Methods to measure.')
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes to measure.')
flags.DEFINE_string('backbone', 'resnet', "'resnet', 'osnet_x1_0' .. 'osnet_x0_25', 'mobilenetv2'.")
flags.DEFINE_integer('depth', 18, 'ResNet depth.')
flags.DEFINE_integer('width', 16, 'ResNet base width (64 = standard).')
flags.DEFINE_integer('height', 64, 'Input height.')
flags.DEFINE_integer('img_width', 32, 'Input width.')
flags.DEFINE_integer('batch', 32, 'Global batch size.')
flags.DEFINE_integer('steps', 10, 'Timed steps per measurement (after one warm-up call).')
flags.DEFINE_integer('num_classes', 512, 'Classifier width.')
flags.DEFINE_integer(
    'train_images',
    1024,
    'Target training-set size for clustering and ' 'feature extraction (Market-1501: 12936).',
)
flags.DEFINE_integer(
    'test_images', 512, 'Query + gallery size for the projected evaluation ' '(Market-1501: 19281).'
)
flags.DEFINE_integer('num_clusters', 64, 'K-means clusters (MMT-500 on Market).')
flags.DEFINE_integer('epochs', 40, 'Projected schedule: epochs.')
flags.DEFINE_integer('iters', 400, 'Projected schedule: iterations per epoch.')
flags.DEFINE_string('out', '', 'Write the results to this JSON file (folders created).')
common.define_alias(flags.FLAGS, 'json', 'out')
flags.DEFINE_integer(
    'cluster_dim',
    0,
    'Feature dimension for the clustering measurement ' "(0 = the model's; 2048 = ResNet-50).",
)
flags.DEFINE_bool('scan', None, 'Use lax.scan for the step loop (default: not on CPU).')
flags.DEFINE_string(
    'profile_dir',
    '',
    'Also trace one more timed chunk per method and dtype with jax.profiler into '
    'DIR/<method>_<dtype> (a Perfetto JSON; `python experiments/summarise_trace.py DIR/...` '
    'gives the time per kernel and kind of kernel).',
)
common.define_verbose(flags.FLAGS)
FLAGS = flags.FLAGS
DTYPES = ('float32', 'bfloat16')  # those with a peak in PEAK_TFLOPS

# Dense peak TFLOP/s by device kind (vendor figures); used for MFU where known. On NVIDIA GPUs
# from Ampere on, XLA runs float32 convolutions and matrix products at JAX's default precision on
# TF32 tensor cores (measured on the H100: an 8192^3 float32 product ran at 353 TFLOP/s by
# default, 50 TFLOP/s at precision='highest'; experiments/gpu_h100/ceilings.log), so float32 MFU
# is taken against the TF32 peak there.
PEAK_TFLOPS = {
    'H100': {'float32': 494.7, 'bfloat16': 989.4},
    'H200': {'float32': 494.7, 'bfloat16': 989.4},
    'A100': {'float32': 156.0, 'bfloat16': 312.0},
    'TPU v4': {'float32': 275.0, 'bfloat16': 275.0},
    'TPU v5': {'float32': 197.0, 'bfloat16': 197.0},
}


def peak_tflops(device_kind: str, dtype: str):
  for key, peaks in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return peaks[dtype]
  return None


def peak_memory_bytes() -> tuple[int, str]:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process max RSS'


def structured_features(n: int, dim: int, ids: int, seed: int = 0):
  """Unit features around `ids` random centres (noisy clusters), like a re-ID feature set."""
  import numpy as np

  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(ids, dim)).astype(np.float32)
  x = centres[rng.integers(0, ids, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def create_model(arch: str = 'resnet', dtype: str = 'float32'):
  """The network the flags describe, with the method's architecture."""
  from jaxreid import models

  return models.create_model(
      dict(
          arch=arch,
          backbone=FLAGS.backbone,
          depth=FLAGS.depth,
          width=FLAGS.width,
          num_classes=FLAGS.num_classes,
          dtype=dtype,
      )
  )


def measure_method(method: str, dtype: str) -> dict:
  import jax
  import numpy as np

  from jaxreid import features as features_lib
  from jaxreid import flops
  from jaxreid import methods as methods_lib
  from jaxreid import models
  from jaxreid import numpy_init
  from jaxreid import train as train_lib

  spec = methods_lib.get(method)
  model = create_model(spec.arch or 'resnet', dtype)
  mesh = train_lib.make_mesh()
  tx = train_lib.make_optimizer(3.5e-4)
  students = [numpy_init.init_variables(model, s) for s in range(spec.num_students)]
  state = train_lib.replicate(
      train_lib.create_train_state(spec, students, tx, jax.random.PRNGKey(0)), mesh
  )
  h, w, b = FLAGS.height, FLAGS.img_width, FLAGS.batch
  n = max(4 * b, 256)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
  labels = (np.arange(n) // 4 % FLAGS.num_classes).astype(np.int32)
  data = train_lib.replicate(
      train_lib.EpochData(
          images=images,
          labels=labels,
          class_mask=models.class_mask(n // 4, FLAGS.num_classes),
          target_images=images,
      ),
      mesh,
  )
  step_fn = methods_lib.make_train_step(
      spec,
      model,
      tx,
      target_bn_pass=method == 'pretrain',
      erasing_prob=0.0 if method == 'pretrain' else 0.5,
      mesh=mesh,
  )
  chunk = train_lib.make_train_chunk(step_fn, mesh, use_scan=FLAGS.scan)
  idx = np.stack([rng.permutation(n)[:b] for _ in range(FLAGS.steps)]).astype(np.int32)
  # The first call compiles (one program for the whole chunk) and runs it; the second is timed.
  # Compile time = first call minus one warm call (so scan and loop drivers compare fairly).
  t0 = time.perf_counter()
  state, m = chunk(state, data, idx, idx)
  jax.block_until_ready(m)
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, m = chunk(state, data, idx, idx)
  jax.block_until_ready(m)
  warm_s = time.perf_counter() - t0
  step_s = warm_s / FLAGS.steps
  compile_s = max(first_s - warm_s, 0.0)
  if FLAGS.profile_dir:
    trace_dir = os.path.join(FLAGS.profile_dir, f'{method}_{dtype}')
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      state, m = chunk(state, data, idx, idx)
      jax.block_until_ready(m)
    print(f'trace of {FLAGS.steps} steps: {trace_dir}', flush=True)

  # Eval feature extraction (teachers' / student's eval forward), fixed batch shape.
  embed = features_lib.make_embed_fn(model, mesh)
  eval_images = rng.integers(0, 256, (max(FLAGS.batch * 8, 512), h, w, 3), dtype=np.uint8)
  variables = [state.variables('net1')]
  features_lib.extract_features(embed, variables, eval_images[:256], 256)  # compile
  t0 = time.perf_counter()
  feats = features_lib.extract_features(embed, variables, eval_images, 256)
  extract_ips = len(eval_images) / (time.perf_counter() - t0)

  # FLOPs per step: 3 x forward for each student (forward + backward), 1 x forward for each
  # teacher and for pre-training's target BN pass.
  fwd = flops.flops_per_image(model, h, w, train=True)
  forwards = 3 * spec.num_students + (spec.num_students if spec.ema else 0)
  forwards += 1 if method == 'pretrain' else 0
  step_flops = fwd * forwards * b
  peak = peak_tflops(jax.devices()[0].device_kind, dtype)
  achieved = step_flops / step_s / 1e12
  mem, mem_kind = peak_memory_bytes()
  return dict(
      method=method,
      dtype=dtype,
      compile_s=compile_s,
      step_ms=step_s * 1e3,
      train_img_s=b / step_s,
      extract_img_s=extract_ips,
      tflops=achieved,
      mfu=(achieved / peak) if peak else None,
      peak_memory_gb=mem / 2**30,
      memory_kind=mem_kind,
      feature_dim=int(feats.shape[1]),
  )


def measure_clustering(method: str, dim: int) -> tuple[float, float]:
  """(first, warm) seconds of features -> labels; the first call includes compilation, which a
  run pays once (epoch 1), so the projection uses the warm time."""
  from jaxreid import clustering
  from jaxreid import retrieval

  feats = structured_features(FLAGS.train_images, dim, max(FLAGS.train_images // 15, 2))

  def once():
    if method == 'abmt':
      graph = retrieval.jaccard_distance(feats, k1=20, k2=6)
      eps = clustering.estimate_eps(graph, 2e-3)
      clustering.dbscan(graph, eps, min_samples=4)
    elif method != 'pretrain':
      clustering.kmeans(feats, FLAGS.num_clusters, seed=0)

  times = []
  for _ in range(2):
    t0 = time.perf_counter()
    once()
    times.append(time.perf_counter() - t0)
  return times[0], times[1]


def check_flags() -> None:
  """Raises app.UsageError (one line, exit status 2) for a value the measurements cannot use."""
  from jaxreid import methods as methods_lib
  from jaxreid import models

  for flag, values, valid in (
      ('backbone', [FLAGS.backbone], models.BACKBONES),
      ('methods', FLAGS.methods, tuple(methods_lib.METHODS)),
      ('dtypes', FLAGS.dtypes, DTYPES),
  ):
    bad = [v for v in values if v not in valid]
    if bad or not values:
      raise app.UsageError(
          f'--{flag}={",".join(bad or values)}: expected {"one" if flag == "backbone" else "some"}'
          f' of {", ".join(valid)} (see --help)'
      )
  if FLAGS.backbone == 'resnet' and FLAGS.depth not in models.RESNET_SPECS:
    raise app.UsageError(f'--depth={FLAGS.depth}: expected one of {sorted(models.RESNET_SPECS)}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])} (see --help)')
  host_memory.apply(FLAGS.keep_host_memory)  # as the trainer does, before JAX starts
  import jax

  from jaxreid import convert

  check_flags()

  device = jax.devices()[0]
  print(
      f'devices: {jax.device_count()} x {device.device_kind} ({jax.default_backend()}); '
      f'{convert.describe_model(create_model())}, {FLAGS.height}x{FLAGS.img_width}, '
      f'batch {FLAGS.batch}',
      flush=True,
  )
  rows = []
  for method in FLAGS.methods:
    cluster_s = None
    for dtype in FLAGS.dtypes:
      r = measure_method(method, dtype)
      if cluster_s is None:
        cluster_first_s, cluster_s = measure_clustering(
            method, FLAGS.cluster_dim or r['feature_dim']
        )
      r['cluster_s'], r['cluster_first_s'] = cluster_s, cluster_first_s
      # Projection for the papers' schedule from measured parts.
      n_teachers = 2 if method == 'mmt' else 1
      extract_s = (FLAGS.train_images * n_teachers + FLAGS.test_images * n_teachers) / r[
          'extract_img_s'
      ]
      if method == 'pretrain':
        r['projected_min'] = 80 * 100 * r['step_ms'] / 1e3 / 60
      else:
        r['projected_min'] = (
            FLAGS.epochs * FLAGS.iters * r['step_ms'] / 1e3 + FLAGS.epochs * (cluster_s + extract_s)
        ) / 60
      rows.append(r)
      print(format_row(r), flush=True)
  print()
  print(format_table(rows))
  if FLAGS.out:
    with open(common.output_path(FLAGS.out), 'w') as f:
      json.dump(
          {
              'device': device.device_kind,
              'backend': jax.default_backend(),
              'num_devices': jax.device_count(),
              'jax': jax.__version__,
              'flags': {
                  k: FLAGS[k].value
                  for k in (
                      'backbone',
                      'depth',
                      'width',
                      'height',
                      'img_width',
                      'batch',
                      'steps',
                      'train_images',
                      'test_images',
                      'num_clusters',
                  )
              },
              'rows': rows,
          },
          f,
          indent=2,
      )
    print(f'wrote {FLAGS.out}')


def format_row(r: dict) -> str:
  mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a'
  return (
      f"{r['method']:13s} {r['dtype']:9s} compile {r['compile_s']:6.1f}s  step "
      f"{r['step_ms']:8.1f} ms  train {r['train_img_s']:8.1f} img/s  extract "
      f"{r['extract_img_s']:8.1f} img/s  cluster {r['cluster_s']:6.2f}s  "
      f"{r['tflops']:6.2f} TFLOP/s (MFU {mfu})  mem {r['peak_memory_gb']:.2f} GB  "
      f"projected {r['projected_min']:.1f} min"
  )


def format_table(rows) -> str:
  head = (
      '| method | dtype | compile s | step ms | train img/s | extract img/s | cluster s | '
      'TFLOP/s | MFU | peak mem GB | projected full run (min) |'
  )
  lines = [head, '|' + '---|' * 11]
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a'
    lines.append(
        f"| {r['method']} | {r['dtype']} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | "
        f"{r['train_img_s']:.1f} | {r['extract_img_s']:.1f} | {r['cluster_s']:.2f} | "
        f"{r['tflops']:.3f} | {mfu} | {r['peak_memory_gb']:.2f} ({r['memory_kind']}) | "
        f"{r['projected_min']:.1f} |"
    )
  return '\n'.join(lines)


def run() -> NoReturn:
  """`python -m jaxreid.benchmark` and `jaxreid-benchmark`: parses the process's arguments,
  measures. Exits."""
  common.run_app(main, doc=__doc__, modules=(__name__, host_memory.__name__, common.__name__))


if __name__ == '__main__':
  run()
