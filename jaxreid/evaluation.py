"""Evaluating networks during a run, and its results as text and plots.

`evaluate_variables` is the Market-1501 protocol (`jaxreid.retrieval`) on a decoded data set's
query and gallery images; `results_line` / `print_summary` are what the log shows; `draw_plots`
redraws the run's figures (`jaxreid.plots`).
"""

from __future__ import annotations

import os
from typing import Sequence

from jaxreid import distributed
from jaxreid import features as features_lib
from jaxreid import retrieval
from jaxreid.input_pipeline import DecodedSet
from jaxreid.metrics_writer import log


def evaluate_variables(
    embed_fn,
    variable_sets: Sequence[dict],
    target: DecodedSet,
    *,
    batch_size: int,
    rerank: bool = False,
    branches: bool = False,
) -> dict:
  """Market-protocol results of the eval features on `target`'s query / gallery.

  `branches` (ABMTNet): also each branch alone, from the halves of the same features
  (`features.branch_features`), as 'avg/mAP', 'avg/top1', 'max/mAP', 'max/top1'.
  """
  ds = target.dataset
  feats = features_lib.extract_features(
      embed_fn, variable_sets, target.test_images, batch_size, label='[evaluate] query + gallery'
  )
  nq = len(target.query)
  ids = (ds.query.pids, ds.gallery.pids, ds.query.camids, ds.gallery.camids)
  results = retrieval.evaluate(feats[:nq], feats[nq:], *ids, rerank=rerank)
  if branches:
    for name, half in zip(('avg', 'max'), features_lib.branch_features(feats)):
      res = retrieval.evaluate(half[:nq], half[nq:], *ids, rerank=rerank)
      results.update({f'{name}/mAP': res['mAP'], f'{name}/top1': res['top1']})
  return results


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
  from jaxreid import plots

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
