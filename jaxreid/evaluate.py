"""Evaluating a trained model on a data set's query / gallery split under the standard protocol.

`load_test_splits` reads a data set's test splits (a Market-layout folder needs only `query/` and
`bounding_box_test/`), `evaluate_model` extracts the features of a loaded model
(`inference.load_model`) and computes the Market protocol's mAP and CMC rank-k as during training
(`jaxreid.retrieval.evaluate`), `results_table` prints them. The command line is
`jaxreid-evaluate` (`jaxreid.tools.evaluate`, also `python -m jaxreid.evaluate`).
"""

from __future__ import annotations

import sys

import numpy as np

from jaxreid import inference
from jaxreid import input_pipeline
from jaxreid import retrieval
from jaxreid.data import DataError
from jaxreid.data import Split
from jaxreid.data import load_dataset
from jaxreid.data import readers

_MARKET_LIKE = {
    'market1501': (None, ('Market-1501-v15.09.15', 'Market-1501', 'market1501')),
    'dukemtmc': (8, ('DukeMTMC-reID', 'dukemtmc-reid', 'dukemtmc')),
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
    base = readers.resolve_root(root, ('query', 'bounding_box_test'), subdirs, name)
    query = readers.read_market_folder(
        base / 'query', keep_distractors=False, max_cam=max_cam, what=name
    )
    gallery = readers.read_market_folder(
        base / 'bounding_box_test', keep_distractors=True, max_cam=max_cam, what=name
    )
    return query, gallery, f'{name} ({base}, test splits only)'


def evaluate_model(
    loaded: inference.LoadedModel,
    query: Split,
    gallery: Split,
    *,
    batch_size: int = 256,
    rerank: bool = False,
) -> tuple[dict, np.ndarray, np.ndarray]:
  """Features of query + gallery (one call: one compiled batch shape) and the protocol's
  metrics. Returns (results, query features, gallery features)."""
  h, w = loaded.height, loaded.width
  images = np.concatenate(
      [
          input_pipeline.decode_images(query.paths, h, w),
          input_pipeline.decode_images(gallery.paths, h, w),
      ]
  )
  feats = loaded.extract(images, batch_size)
  qf, gf = feats[: len(query)], feats[len(query) :]
  results = retrieval.evaluate(
      qf, gf, query.pids, gallery.pids, query.camids, gallery.camids, rerank=rerank
  )
  return results, qf, gf


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
