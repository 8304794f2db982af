"""Evaluating a trained model on a data set's query / gallery split under the standard protocol.

`load_test_splits` reads a data set's test splits (a Market-layout folder needs only `query/` and
`bounding_box_test/`), `evaluate_model` extracts the features of a loaded model
(`inference.load_model`) through `jaxreid.FeatureExtractor` with training's bicubic resize (so
the numbers equal the training-time evaluation's; unreadable images are reported and left out)
and computes the Market protocol's mAP and CMC rank-k as during training
(`jaxreid.retrieval.evaluate`), `results_table` prints them. The command line is
`jaxreid-evaluate` (`jaxreid.tools.evaluate`, also `python -m jaxreid.evaluate`).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from jaxreid import extractor as extractor_lib
from jaxreid import inference
from jaxreid import retrieval
from jaxreid.data import DataError
from jaxreid.data import Split
from jaxreid.data import load_dataset
from jaxreid.data import readers

_MARKET_LIKE = {
    'market1501': (None, readers.MARKET_SUBDIRS),
    'dukemtmc': (8, readers.DUKE_SUBDIRS),
}


def load_test_splits(
    name: str, root: str | None, config: dict | None = None
) -> tuple[Split, Split, str]:
  """(query, gallery, description) of a data set. Synthetic worlds use the run's generator
  settings when the config has them; a Market-layout folder without `bounding_box_train/` is
  fine (evaluation does not need it)."""
  kwargs = {}
  if name.startswith('synthetic') and config and (config.get('data') or {}).get('synthetic'):
    kwargs = dict(config['data']['synthetic'])
  try:
    ds = load_dataset(name, root or None, **kwargs)
    return ds.query, ds.gallery, f'{name} ({ds.root})'
  except DataError:
    if name.lower() not in _MARKET_LIKE or not root:
      raise
    max_cam, subdirs = _MARKET_LIKE[name.lower()]
    ds = readers.read_market_test_split(root, name=name, max_cam=max_cam, subdirs=subdirs)
    return ds.query, ds.gallery, f'{name} ({ds.root}, test splits only)'


def evaluate_model(
    loaded: inference.LoadedModel,
    query: Split,
    gallery: Split,
    *,
    batch_size: int = 256,
    rerank: bool = False,
    interpolation: str = 'bicubic',
) -> tuple[dict, np.ndarray, np.ndarray, Split, Split]:
  """Features of query + gallery (one pass: one compiled batch shape) and the protocol's
  metrics. Returns (results, query features, gallery features, query, gallery): the splits the
  feature rows belong to.

  Unreadable (corrupt, truncated, missing) images are left out of both splits, with one line on
  stderr naming the first few: a damaged file should not cost the whole evaluation. The default
  resize is training's ('bicubic'); 'bilinear' is torchreid's.
  """
  ext = extractor_lib.FeatureExtractor(loaded, batch_size, interpolation=interpolation)
  out = ext.extract_paths([*query.paths, *gallery.paths], skip_unreadable=True)
  if out.skipped:
    bad = {p for p, _ in out.skipped}
    names = ', '.join(os.path.basename(p) for p, _ in out.skipped[:5])
    more = ', ...' if len(bad) > 5 else ''
    print(
        f'warning: skipped {len(out.skipped)} unreadable image(s) of '
        f'{len(query) + len(gallery)}: {names}{more}',
        file=sys.stderr,
        flush=True,
    )
    query, gallery = _without(query, bad), _without(gallery, bad)
    if len(query) == 0 or len(gallery) == 0:
      raise inference.InferenceError(
          f'no readable {"query" if len(query) == 0 else "gallery"} image left '
          f'({len(out.skipped)} unreadable, e.g. {out.skipped[0][0]}: {out.skipped[0][1]})'
      )
  qf, gf = out.features[: len(query)], out.features[len(query) :]
  results = retrieval.evaluate(
      qf, gf, query.pids, gallery.pids, query.camids, gallery.camids, rerank=rerank
  )
  return results, qf, gf, query, gallery


def _without(split: Split, paths: set) -> Split:
  keep = np.array([p not in paths for p in split.paths], bool)
  return dataclasses.replace(
      split, paths=split.paths[keep], pids=split.pids[keep], camids=split.camids[keep]
  )


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


if (
    __name__ == '__main__'
):  # `python -m jaxreid.evaluate`: the command line is jaxreid.tools.evaluate
  from jaxreid.tools import evaluate as _tool

  sys.exit(_tool.main())
