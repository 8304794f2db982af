"""Evaluate a trained model on a data set's query / gallery split under the standard protocol.

  python -m jaxreid.evaluate --model=workdirs/mmt_duke_to_market --data=market1501 \\
      --data_root=/data/Market-1501 [--rerank] [--export_features=feats/] [--batch_size=256]

`--model` is a work dir (its `model.msgpack` and `config.json`) or a `.msgpack` file (its
config.json is looked for next to it and in the parent folder). Without a config.json the
architecture is read off the weights' shapes and the input size defaults to 256x128; `--arch`,
`--depth`, `--width`, `--ibn`, `--height`, `--img_width` override either. The protocol is the
Market one (same identity *and* camera removed from each query's gallery; mAP and CMC rank-k),
as during training (`jaxreid.retrieval.evaluate`). A Market-layout folder needs only `query/` and
`bounding_box_test/` here (no training images).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

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


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m jaxreid.evaluate',
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split('\n', 1)[1],
  )
  p.add_argument('--model', required=True, help='work dir of a finished run, or a .msgpack')
  p.add_argument(
      '--data',
      required=True,
      help='data set name: market1501 (any Market-layout folder), dukemtmc, msmt17, '
      'msmt17_v2, synthetic_a, synthetic_b',
  )
  p.add_argument(
      '--data_root',
      default='',
      help='the data set folder ($JAXREID_DATA/<name> '
      'when empty; not needed for synthetic sets)',
  )
  p.add_argument(
      '--rerank',
      action='store_true',
      help='k-reciprocal re-ranking (k1=20, k2=6, ' 'lambda=0.3) before the metrics',
  )
  p.add_argument(
      '--export_features',
      default='',
      metavar='DIR',
      help='write query/gallery features (.npy), their paths / pids / camids (.json) '
      'and results.json into DIR',
  )
  p.add_argument('--batch_size', type=int, default=256, help='images per feature batch')
  inference.add_model_flags(p)
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.batch_size < 1:
    print('error: --batch_size must be positive', file=sys.stderr)
    return 2
  try:
    loaded = inference.load_model(args.model, inference.model_overrides(args))
    print(f'model: {loaded.weights_path}\n  {loaded.describe()}', flush=True)
    query, gallery, desc = load_test_splits(args.data, args.data_root, loaded.config)
    if len(query) == 0 or len(gallery) == 0:
      raise DataError(
          f'{desc}: {len(query)} query and {len(gallery)} gallery images; both are ' 'needed'
      )
    print(
        f'data: {desc}: {len(query)} queries ({query.num_pids} ids), {len(gallery)} gallery '
        f'images ({gallery.num_pids} ids)',
        flush=True,
    )
    t0 = time.time()
    results, qf, gf = evaluate_model(
        loaded, query, gallery, batch_size=args.batch_size, rerank=args.rerank
    )
  except (inference.InferenceError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except ValueError as e:  # e.g. no query with a true match in another camera
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(
      f'features and metrics in {time.time() - t0:.1f}s'
      f'{" (re-ranked)" if args.rerank else ""}\n'
  )
  print(results_table(results))
  if args.export_features:
    extra = {'model': os.path.abspath(loaded.weights_path), 'data': desc}
    written = inference.export_features(
        args.export_features,
        {
            'query': dict(features=qf, paths=query.paths, pids=query.pids, camids=query.camids),
            'gallery': dict(
                features=gf, paths=gallery.paths, pids=gallery.pids, camids=gallery.camids
            ),
        },
        extra,
    )
    res_path = os.path.join(args.export_features, 'results.json')
    with open(res_path, 'w') as f:
      json.dump({**results, 'rerank': args.rerank, **extra}, f, indent=2)
    print('\nwrote ' + ', '.join(written + [res_path]))
  return 0


if __name__ == '__main__':
  sys.exit(main())
