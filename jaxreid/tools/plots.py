"""Redraw the plots of jaxreid runs from their metrics, and compare runs in one figure.

  jaxreid-plots WORKDIR [WORKDIR ...] [--compare=compare.png] [--labels=mmt,abmt]
  (or python -m jaxreid.tools.plots ...)

Each WORKDIR is the work dir of a run (finished or not): its `<workdir>/plots/*.png` (overview,
losses, accuracy, clusters, ...) are redrawn from `<workdir>/metrics.jsonl` and their paths
printed. `--compare` also writes one figure comparing all the given runs (mAP, rank-1, coupling
and the number of clusters over the epochs, one colour per run), named by `--labels`. Work dirs
without metrics are an error (one line naming them, exit status 2; no comparison is drawn) and
the others are still drawn.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from jaxreid import plots
from jaxreid.tools import common

FLAGS = common.flag_values()
flags.DEFINE_string(
    'compare',
    '',
    'OUT.png: also write one figure comparing all the given runs (folders created)',
    flag_values=FLAGS,
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
  # ValueError: plot_comparison's (e.g. no run has adaptation records yet)
  return common.run(_plots, FLAGS, argv, doc=__doc__, args_name='WORKDIR', errors=(ValueError,))


def _plots(workdirs: list[str]) -> int:
  labels = [s.strip() for s in FLAGS.labels.split(',')] if FLAGS.labels else None
  if labels is not None and len(labels) != len(workdirs):
    raise common.UsageError(
        f'--labels has {len(labels)} names for {len(workdirs)} work dirs; give one per work dir'
    )
  if FLAGS.compare:
    common.output_path(FLAGS.compare)
  failed = []
  for w in workdirs:
    try:
      paths = plots.plot_run(w)
    except FileNotFoundError as e:
      failed.append(str(e))
      continue
    if not paths:
      print(f'{w}: nothing to plot yet (no adaptation or pre-training epochs recorded)')
    for path in paths:
      print(path)
  if failed:  # one line for all of them; a comparison would only repeat it
    raise common.UsageError('; '.join(failed))
  if FLAGS.compare:
    print(plots.plot_comparison(workdirs, FLAGS.compare, labels))
  return 0


if __name__ == '__main__':
  sys.exit(main())
