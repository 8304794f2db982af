"""Redraw the plots of jaxreid runs from their metrics, and compare runs in one figure.

  jaxreid-plots WORKDIR [WORKDIR ...] [--compare=compare.png] [--labels=mmt,abmt]
  (or python -m jaxreid.plots ...)

Each WORKDIR is the work dir of a run (finished or not): its `<workdir>/plots/*.png` (overview,
losses, accuracy, clusters, ...) are redrawn from `<workdir>/metrics.jsonl` and their paths
printed. `--compare` also writes one figure comparing all the given runs (mAP, rank-1, coupling
and the number of clusters over the epochs, one colour per run), named by `--labels`. A work dir without metrics is an error (one line, exit status 2)
and the others are still drawn.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from jaxreid import plots
from jaxreid.tools import common

FLAGS = flags.FlagValues()
flags.DEFINE_string(
    'compare', '', 'OUT.png: also write one figure comparing all the given runs', flag_values=FLAGS
)
flags.DEFINE_string(
    'labels',
    '',
    "comma-separated legend names for --compare, one per work dir (default: the work dirs' "
    'folder names)',
    flag_values=FLAGS,
)


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxreid-plots`; argv without the program name (None: the process's). Exit status."""
  return common.run(_plots, FLAGS, argv, doc=__doc__, args_name='WORKDIR')


def _plots(workdirs: list[str]) -> int:
  labels = [s.strip() for s in FLAGS.labels.split(',')] if FLAGS.labels else None
  if labels is not None and len(labels) != len(workdirs):
    return common.fail(
        f'--labels has {len(labels)} names for {len(workdirs)} work dirs; give one per work dir'
    )
  status = 0
  for w in workdirs:
    try:
      paths = plots.plot_run(w)
    except FileNotFoundError as e:
      status = common.fail(e)
      continue
    if not paths:
      print(f'{w}: nothing to plot yet (no adaptation or pre-training epochs recorded)')
    for path in paths:
      print(path)
  if FLAGS.compare:
    try:
      print(plots.plot_comparison(workdirs, FLAGS.compare, labels))
    except (FileNotFoundError, ValueError) as e:
      status = common.fail(e)
  return status


if __name__ == '__main__':
  sys.exit(main())
