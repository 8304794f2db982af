"""Is a change better than the baseline beyond seed noise? Train variants over seeds and compare.

  jaxreid-compare --config=configs/mmt.py --seeds=3 --out=compare/margin \\
      --variant=baseline \\
      --variant='margin=--config=experiments/extra_loss_example.py --config.loss.margin_tri=0.5'
  (or python -m jaxreid.tools.compare ...)

Each `--variant=NAME[=ARGS]` is a training command: `python -m jaxreid.main` with the shared
`--config`, then `--args`, then ARGS (a `--config=` in ARGS replaces the shared one); the first
variant is the baseline. Every variant runs with every seed of `--seeds` (`3` = seeds 1, 2, 3, or
a list `1,2,5`) as `--config.seed=S --workdir=OUT/NAME/seedS`, its output in
OUT/NAME/seedS/log.txt, seed by seed (seed 1 of every variant, then seed 2, ...). The seed
varies the adaptation; every run starts from the same source models (config.pretrain.seed) unless
the arguments say otherwise: `{seed}` in ARGS or --args becomes the run's seed, so
`--args='--config.pretrain.seed={seed}'` gives each seed its own source models. Rerunning the
same command skips the finished runs and resumes an interrupted one; `--dry_run` prints the
commands.

It prints, per variant, the mean +- std over seeds of the target's `--metric`, of top-1 (mAP
when the metric is top1) and of the source-only level, and for each other variant the per-seed
differences from the baseline with a 95% paired t interval of their mean (and a bootstrap one):
an interval without 0 is "better / worse than the baseline beyond seed noise", else "within seed
noise" (one seed: no interval). OUT/comparison.json holds every run's command and results and
the statistics; OUT/comparison.png plots them. Errors (a bad variant or seed list, a config that
does not exist, a failed run: its log named) are one line; exit status 2.
"""

from __future__ import annotations

import shlex
import sys
from typing import Sequence

from absl import flags

from jaxreid import compare
from jaxreid import main as train_main
from jaxreid.tools import common

FLAGS = common.flag_values()
flags.DEFINE_multi_string(
    'variant',
    None,
    'NAME or NAME=ARGS: a variant, named NAME (its folder under --out), trained with the extra '
    '`python -m jaxreid.main` arguments ARGS (quoted as in a shell); repeat for each variant, '
    'the first is the baseline',
    flag_values=FLAGS,
)
flags.DEFINE_string(
    'config',
    '',
    'the config file (configs/*.py[:task]) of every variant that names none in its ARGS',
    flag_values=FLAGS,
)
flags.DEFINE_string(
    'args',
    '',
    "more `python -m jaxreid.main` arguments for every variant's runs, before each variant's "
    'own (e.g. the data root of a real task)',
    flag_values=FLAGS,
)
flags.DEFINE_string(
    'seeds', '3', 'a count (3 = seeds 1, 2, 3) or a comma-separated list (1,2,5)', flag_values=FLAGS
)
flags.DEFINE_string(
    'out',
    None,
    'the comparison folder: OUT/NAME/seedS per run, OUT/comparison.json, .png',
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    'metric', 'mAP', list(compare.METRICS), 'the target metric compared', flag_values=FLAGS
)
flags.DEFINE_bool(
    'dry_run',
    False,
    "print the runs' commands (and which are finished); run nothing",
    flag_values=FLAGS,
)


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxreid-compare`; argv without the program name (None: the process's). Exit status."""
  return common.run(
      _compare, FLAGS, argv, doc=__doc__, required=('out',), errors=(compare.CompareError,)
  )


def _compare() -> int:
  variants = [compare.parse_variant(v) for v in FLAGS.variant or []]
  seeds = compare.parse_seeds(FLAGS.seeds)
  try:
    shared = shlex.split(FLAGS.args)
  except ValueError as e:
    raise common.UsageError(f'--args: cannot split its arguments ({e})') from None
  runs = compare.plan(variants, seeds, FLAGS.out, FLAGS.config, shared)
  # Every variant's config and overrides are checked now, not when its first run comes.
  for v in variants:
    try:
      train_main.check_config_args(compare.variant_args(v, FLAGS.config, shared))
    except common.UsageError as e:
      raise common.UsageError(f'variant {v.name}: {e}') from e
  if FLAGS.dry_run:
    for run in runs:
      done = '  # finished' if compare.is_finished(run) else ''
      print(shlex.join(run.command) + done)
    return 0
  try:
    results = compare.run_all(runs, FLAGS.metric)
  except compare.Interrupted as e:
    return common.fail(e, status=130)  # the shell's status for Ctrl-C
  summary = compare.summarise(variants, seeds, runs, results, FLAGS.metric)
  print('\n' + compare.report(summary) + '\n')
  for path in compare.write(summary, FLAGS.out):
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
