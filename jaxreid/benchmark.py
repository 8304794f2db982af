"""Measured speed of every method, for comparing accelerators (`jaxreid-benchmark`, whose flags
are `Settings`' fields).

For each method (pre-training, mean-teacher baseline, MMT, ABMT) and compute dtype, on whatever
devices are present (`measure_method`, `measure_clustering`, both through `run`):
  - compile time of the training step (reported separately) and warm step time / images per
    second (the step driver the trainer uses, state donated, timed over `steps` steps);
  - eval feature extraction images per second;
  - clustering time at the data set's size (K-means for MMT and the baselines, Jaccard + DBSCAN
    for ABMT) on random unit features with identity structure;
  - peak device memory (GPU / TPU memory stats; process max RSS on CPU);
  - model FLOPs utilisation against the device's peak where known;
  - the projected end-to-end time of the papers' schedule (`epochs` x `iters` steps, clustering
    and evaluation every epoch) from the parts.
`format_row` / `format_table` print the rows and `record` is the JSON the tool writes.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import Callable
from typing import Sequence

import jax
import numpy as np

from jaxreid import convert
from jaxreid import features as features_lib
from jaxreid import flops
from jaxreid import methods as methods_lib
from jaxreid import models
from jaxreid import numpy_init
from jaxreid import pseudo_labels
from jaxreid import retrieval
from jaxreid import train as train_lib

DTYPES = ('float32', 'bfloat16')  # those with a peak in PEAK_TFLOPS

# Dense peak TFLOP/s by device kind (vendor figures); used for MFU where known. On NVIDIA GPUs
# from Ampere on, XLA runs float32 convolutions and matrix products at JAX's default precision on
# TF32 tensor cores, so float32 MFU is taken against the TF32 peak there.
PEAK_TFLOPS = {
    'H100': {'float32': 494.7, 'bfloat16': 989.4},
    'H200': {'float32': 494.7, 'bfloat16': 989.4},
    'A100': {'float32': 156.0, 'bfloat16': 312.0},
    'TPU v4': {'float32': 275.0, 'bfloat16': 275.0},
    'TPU v5': {'float32': 197.0, 'bfloat16': 197.0},
}

# The settings recorded in the JSON output (under 'flags': the tool's flags of the same names).
RECORDED = (
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


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to measure and at what size. The defaults are CPU-sized; the papers' setting is
  `depth=50, width=64, height=256, img_width=128, batch=64`."""

  methods: Sequence[str] = ('pretrain', 'mean_teacher', 'mmt', 'abmt')
  dtypes: Sequence[str] = DTYPES
  backbone: str = 'resnet'  # 'resnet', 'osnet_x1_0' .. 'osnet_x0_25', 'mobilenetv2'
  depth: int = 18  # ResNet depth
  width: int = 16  # ResNet base width (64 = standard)
  height: int = 64  # input height
  img_width: int = 32  # input width
  batch: int = 32  # global batch size
  steps: int = 10  # timed steps per measurement (after one warm-up call)
  num_classes: int = 512  # classifier width
  train_images: int = 1024  # training-set size for clustering and feature extraction
  test_images: int = 512  # query + gallery size for the projected evaluation
  num_clusters: int = 64  # K-means clusters
  epochs: int = 40  # projected schedule: epochs
  iters: int = 400  # projected schedule: iterations per epoch
  cluster_dim: int = 0  # feature dimension for clustering (0 = the model's)
  scan: bool | None = None  # lax.scan for the step loop (None: not on CPU)
  profile_dir: str = ''  # also trace one more chunk per method and dtype into DIR/<method>_<dtype>


def peak_tflops(device_kind: str, dtype: str):
  for key, peaks in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return peaks[dtype]
  return None


def peak_memory_bytes() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process max RSS'


def structured_features(n: int, dim: int, ids: int, seed: int = 0):
  """Unit features around `ids` random centres (noisy clusters), like a re-ID feature set."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(ids, dim)).astype(np.float32)
  x = centres[rng.integers(0, ids, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def create_model(settings: Settings, arch: str = 'resnet', dtype: str = 'float32'):
  """The network the settings describe, with the method's architecture."""
  return models.create_model(
      dict(
          arch=arch,
          backbone=settings.backbone,
          depth=settings.depth,
          width=settings.width,
          num_classes=settings.num_classes,
          dtype=dtype,
      )
  )


def measure_method(settings: Settings, method: str, dtype: str) -> dict:
  s = settings
  spec = methods_lib.get(method)
  model = create_model(s, spec.arch or 'resnet', dtype)
  mesh = train_lib.make_mesh()
  tx = train_lib.make_optimizer(3.5e-4)
  students = [numpy_init.init_variables(model, seed) for seed in range(spec.num_students)]
  state = train_lib.replicate(
      train_lib.create_train_state(spec, students, tx, jax.random.PRNGKey(0)), mesh
  )
  h, w, b = s.height, s.img_width, s.batch
  n = max(4 * b, 256)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
  labels = (np.arange(n) // 4 % s.num_classes).astype(np.int32)
  data = train_lib.replicate(
      train_lib.EpochData(
          images=images,
          labels=labels,
          class_mask=models.class_mask(n // 4, s.num_classes),
          target_images=images,
      ),
      mesh,
  )
  step_fn = train_lib.make_train_step(
      spec,
      model,
      tx,
      target_bn_pass=method == 'pretrain',
      erasing_prob=0.0 if method == 'pretrain' else 0.5,
      mesh=mesh,
  )
  chunk = train_lib.make_train_chunk(step_fn, mesh, use_scan=s.scan)
  idx = np.stack([rng.permutation(n)[:b] for _ in range(s.steps)]).astype(np.int32)
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
  step_s = warm_s / s.steps
  compile_s = max(first_s - warm_s, 0.0)
  if s.profile_dir:
    trace_dir = os.path.join(s.profile_dir, f'{method}_{dtype}')
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      state, m = chunk(state, data, idx, idx)
      jax.block_until_ready(m)
    print(f'trace of {s.steps} steps: {trace_dir}', flush=True)

  # Eval feature extraction (teachers' / student's eval forward), fixed batch shape.
  embed = features_lib.make_embed_fn(model, mesh)
  eval_images = rng.integers(0, 256, (max(s.batch * 8, 512), h, w, 3), dtype=np.uint8)
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


def measure_clustering(settings: Settings, method: str, dim: int) -> tuple[float, float]:
  """(first, warm) seconds of features -> labels; the first call includes compilation, which a
  run pays once (epoch 1), so the projection uses the warm time."""
  feats = structured_features(settings.train_images, dim, max(settings.train_images // 15, 2))

  def once():
    if method == 'abmt':
      graph = retrieval.jaccard_distance(feats, k1=20, k2=6)
      eps = pseudo_labels.estimate_eps(graph, 2e-3)
      pseudo_labels.dbscan(graph, eps, min_samples=4)
    elif method != 'pretrain':
      pseudo_labels.kmeans(feats, settings.num_clusters, seed=0)

  times = []
  for _ in range(2):
    t0 = time.perf_counter()
    once()
    times.append(time.perf_counter() - t0)
  return times[0], times[1]


def _print(line: str) -> None:
  print(line, flush=True)


def run(settings: Settings, report: Callable[[str], None] = _print) -> list[dict]:
  """Measures every method and dtype of `settings`; returns one row each, with the projected time
  of the whole schedule. `report` gets the devices line and each row as it is measured."""
  s = settings
  device = jax.devices()[0]
  report(
      f'devices: {jax.device_count()} x {device.device_kind} ({jax.default_backend()}); '
      f'{convert.describe_model(create_model(s))}, {s.height}x{s.img_width}, batch {s.batch}'
  )
  rows = []
  for method in s.methods:
    cluster_s = None
    for dtype in s.dtypes:
      r = measure_method(s, method, dtype)
      if cluster_s is None:
        cluster_first_s, cluster_s = measure_clustering(
            s, method, s.cluster_dim or r['feature_dim']
        )
      r['cluster_s'], r['cluster_first_s'] = cluster_s, cluster_first_s
      # Projection for the papers' schedule from measured parts.
      n_teachers = 2 if method == 'mmt' else 1
      extract_s = (s.train_images * n_teachers + s.test_images * n_teachers) / r['extract_img_s']
      if method == 'pretrain':
        r['projected_min'] = 80 * 100 * r['step_ms'] / 1e3 / 60
      else:
        r['projected_min'] = (
            s.epochs * s.iters * r['step_ms'] / 1e3 + s.epochs * (cluster_s + extract_s)
        ) / 60
      rows.append(r)
      report(format_row(r))
  return rows


def record(settings: Settings, rows: list[dict]) -> dict:
  """The JSON record of a run: the devices, the settings that set the sizes, the rows."""
  return {
      'device': jax.devices()[0].device_kind,
      'backend': jax.default_backend(),
      'num_devices': jax.device_count(),
      'jax': jax.__version__,
      'flags': {k: getattr(settings, k) for k in RECORDED},
      'rows': rows,
  }


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
