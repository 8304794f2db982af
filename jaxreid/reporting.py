"""A run's results as people read them: the one-line results of an evaluation, the summary table
at the end of a run, the table of `jaxreid-evaluate`, and the run's figures (`jaxreid.plots`).
"""

from __future__ import annotations

import os

from jaxreid import distributed
from jaxreid import plots
from jaxreid.metrics_writer import log


def results_line(results: dict) -> str:
  line = (
      f"mAP {results['mAP']:.1f} top1 {results['top1']:.1f} top5 {results['top5']:.1f} "
      f"top10 {results['top10']:.1f}"
  )
  if 'avg/mAP' in results:  # ABMTNet: each branch alone
    line += f" (branch mAP avg {results['avg/mAP']:.1f} max {results['max/mAP']:.1f})"
  return line


def draw_plots(workdir: str, *, overview_only: bool = False) -> None:
  """Redraws `<workdir>/plots/` (`jaxreid.plots`); a plotting problem never stops a run."""
  if not distributed.is_primary():
    return
  try:
    written = plots.plot_run(workdir, per_panel=not overview_only, pretrain=not overview_only)
  except Exception as e:  # pylint: disable=broad-except
    log(f'[plots] skipped: {type(e).__name__}: {e}')
    return
  if written and not overview_only:
    log(f'[plots] {len(written)} figures in {os.path.join(workdir, "plots")}')


def domain_name(config, which: str) -> str:
  """A readable name for the source / target data set (the folder name for a custom root)."""
  root = config.data.get(f'{which}_root', '')
  return os.path.basename(os.path.normpath(root)) if root else config.data[which]


def print_summary(config, summary: dict) -> None:
  title = f'{config.method}: {domain_name(config, "source")} -> {domain_name(config, "target")}'
  lines = [
      title,
      '-' * len(title),
      f'{"model":32s} {"mAP":>6s} {"top1":>6s} {"top5":>6s} {"top10":>6s}',
  ]
  for name, r in summary.items():
    if not r or 'mAP' not in r:
      lines.append(f'{name:32s} not evaluated (no labelled test set, or no epoch evaluated)')
    else:
      lines.append(
          f'{name:32s} {r["mAP"]:6.1f} {r["top1"]:6.1f} {r["top5"]:6.1f} ' f'{r["top10"]:6.1f}'
      )
  log('\n'.join(lines))


def results_table(results: dict) -> str:
  """mAP, rank-1/5/10 (percent, 2 decimals) and the number of queries, as an aligned table."""
  cols = [('mAP', f'{results["mAP"]:.2f}')]
  cols += [
      (f'rank-{k[3:]}', f'{results[k]:.2f}') for k in ('top1', 'top5', 'top10') if k in results
  ]
  cols.append(('queries', f'{results["num_valid_queries"]}/{results["num_queries"]}'))
  widths = [max(len(a), len(b)) for a, b in cols]
  head = ' | '.join(a.rjust(w) for (a, _), w in zip(cols, widths))
  rule = '-+-'.join('-' * w for w in widths)
  row = ' | '.join(b.rjust(w) for (_, b), w in zip(cols, widths))
  note = (
      '(percent; queries = with a true match in another camera / all; '
      'the others are skipped, as in the standard protocol)'
  )
  return '\n'.join([head, rule, row, note])
