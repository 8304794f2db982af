"""Benchmark: measured speed of every method, for comparing accelerators.

  jaxreid-benchmark --methods=pretrain,mmt --dtypes=float32,bfloat16 --steps=5
  (or python -m jaxreid.tools.benchmark ...)

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

import dataclasses
import json

from absl import app
from absl import flags

from jaxreid import benchmark
from jaxreid import host_memory
from jaxreid import methods as methods_lib
from jaxreid import models
from jaxreid.tools import common

_DEFAULTS = benchmark.Settings()

# On absl's global FLAGS and `app.run`, as the trainer (common.run_app).
flags.DEFINE_list('methods', list(_DEFAULTS.methods), 'Methods to measure.')
flags.DEFINE_list('dtypes', list(_DEFAULTS.dtypes), 'Compute dtypes to measure.')
flags.DEFINE_string(
    'backbone', _DEFAULTS.backbone, "'resnet', 'osnet_x1_0' .. 'osnet_x0_25', 'mobilenetv2'."
)
flags.DEFINE_integer('depth', _DEFAULTS.depth, 'ResNet depth.')
flags.DEFINE_integer('width', _DEFAULTS.width, 'ResNet base width (64 = standard).')
flags.DEFINE_integer('height', _DEFAULTS.height, 'Input height.')
flags.DEFINE_integer('img_width', _DEFAULTS.img_width, 'Input width.')
flags.DEFINE_integer('batch', _DEFAULTS.batch, 'Global batch size.')
flags.DEFINE_integer(
    'steps', _DEFAULTS.steps, 'Timed steps per measurement (after one warm-up call).'
)
flags.DEFINE_integer('num_classes', _DEFAULTS.num_classes, 'Classifier width.')
flags.DEFINE_integer(
    'train_images',
    _DEFAULTS.train_images,
    'Target training-set size for clustering and feature extraction (Market-1501: 12936).',
)
flags.DEFINE_integer(
    'test_images',
    _DEFAULTS.test_images,
    'Query + gallery size for the projected evaluation (Market-1501: 19281).',
)
flags.DEFINE_integer(
    'num_clusters', _DEFAULTS.num_clusters, 'K-means clusters (MMT-500 on Market).'
)
flags.DEFINE_integer('epochs', _DEFAULTS.epochs, 'Projected schedule: epochs.')
flags.DEFINE_integer('iters', _DEFAULTS.iters, 'Projected schedule: iterations per epoch.')
flags.DEFINE_string('out', '', 'Write the results to this JSON file (folders created).')
common.define_alias(flags.FLAGS, 'json', 'out')
flags.DEFINE_integer(
    'cluster_dim',
    _DEFAULTS.cluster_dim,
    "Feature dimension for the clustering measurement (0 = the model's; 2048 = ResNet-50).",
)
flags.DEFINE_bool('scan', _DEFAULTS.scan, 'Use lax.scan for the step loop (default: not on CPU).')
flags.DEFINE_string(
    'profile_dir',
    _DEFAULTS.profile_dir,
    'Also trace one more timed chunk per method and dtype with jax.profiler into '
    'DIR/<method>_<dtype> (a Perfetto JSON; `python experiments/benchmarks/summarise_trace.py '
    'DIR/...` gives the time per kernel and kind of kernel).',
)
common.define_keep_host_memory(flags.FLAGS)
common.define_verbose(flags.FLAGS)
FLAGS = flags.FLAGS


def settings_from_flags() -> benchmark.Settings:
  """The parsed flags as `benchmark.Settings` (the flags are its fields, by name)."""
  return benchmark.Settings(
      **{f.name: FLAGS[f.name].value for f in dataclasses.fields(benchmark.Settings)}
  )


def check_flags() -> None:
  """Raises app.UsageError (one line, exit status 2) for a value the measurements cannot use."""
  for flag, values, valid in (
      ('backbone', [FLAGS.backbone], models.BACKBONES),
      ('methods', FLAGS.methods, tuple(methods_lib.METHODS)),
      ('dtypes', FLAGS.dtypes, benchmark.DTYPES),
  ):
    bad = [v for v in values if v not in valid]
    if bad or not values:
      raise app.UsageError(
          f'--{flag}={",".join(bad or values)}: expected {"one" if flag == "backbone" else "some"}'
          f' of {", ".join(valid)} (see --help)'
      )
  if FLAGS.backbone == 'resnet' and FLAGS.depth not in models.RESNET_SPECS:
    raise app.UsageError(f'--depth={FLAGS.depth}: expected one of {sorted(models.RESNET_SPECS)}')


def _benchmark(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])} (see --help)')
  host_memory.apply(FLAGS.keep_host_memory)  # as the trainer does, before JAX starts
  check_flags()
  settings = settings_from_flags()
  rows = benchmark.run(settings)
  print()
  print(benchmark.format_table(rows))
  if FLAGS.out:
    with open(common.output_path(FLAGS.out), 'w') as f:
      json.dump(benchmark.record(settings, rows), f, indent=2)
    print(f'wrote {FLAGS.out}')


def main() -> None:
  """`jaxreid-benchmark`: parses the process's arguments, measures. Exits (as `absl.app.run`)."""
  common.run_app(_benchmark, doc=__doc__, modules=(__name__, common.__name__))


if __name__ == '__main__':
  main()
