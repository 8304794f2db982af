"""Evaluate a trained model on a data set's query / gallery split under the standard protocol.

  jaxreid-evaluate --model=workdirs/mmt_duke_to_market --data=market1501 \\
      --data_root=/data/Market-1501 [--rerank] [--export_features=feats/] [--batch_size=256]
  (or python -m jaxreid.tools.evaluate ...)

`--model` is a work dir (its `model.msgpack` and `config.json`), a `.msgpack` file (its
config.json is looked for next to it and in the parent folder) or a PyTorch file (converted in
memory). Without a config.json the architecture is read off the weights' shapes and the input
size defaults to 256x128; `--arch`, `--backbone`, `--depth`, `--width`, `--ibn`, `--height`,
`--img_width` override either. The protocol is the Market one (same identity *and* camera removed
from each query's gallery; mAP and CMC rank-k), as during training
(`jaxreid.retrieval.market_metrics`). A Market-layout folder needs only `query/` and
`bounding_box_test/` here (no training images).
Errors (a missing folder, weights that do not fit the model, ...) are one line; exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from absl import flags

from jaxreid import inference
from jaxreid import reporting
from jaxreid.evaluator import Evaluator
from jaxreid.tools import common
from jaxreid.tools import inference_flags

FLAGS = common.flag_values()
flags.DEFINE_string('model', None, common.MODEL_HELP, flag_values=FLAGS)
flags.DEFINE_string(
    'data',
    None,
    'data set name: market1501 (any Market-layout folder), dukemtmc, msmt17, msmt17_v2, '
    'synthetic_a, synthetic_b',
    flag_values=FLAGS,
)
flags.DEFINE_string(
    'data_root',
    '',
    'the data set folder ($JAXREID_DATA/<name> when empty; not needed for synthetic sets)',
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    'rerank',
    False,
    'k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3) before the metrics',
    flag_values=FLAGS,
)
inference_flags.define(FLAGS, exported='their paths / pids / camids (.json) and results.json')


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxreid-evaluate`; argv without the program name (None: the process's). Exit status."""
  # ValueError: besides InferenceError and DataError, e.g. no query with a true match elsewhere
  return common.run(
      _evaluate, FLAGS, argv, doc=__doc__, required=('model', 'data'), errors=(ValueError,)
  )


def _evaluate() -> int:
  loaded = inference.load_model(FLAGS.model, inference_flags.model_overrides(FLAGS))
  print(f'model: {loaded.weights_path}\n  {loaded.describe()}', flush=True)
  evaluator = Evaluator.load(FLAGS.data, FLAGS.data_root, loaded.config, rerank=FLAGS.rerank)
  desc = evaluator.name
  query, gallery = evaluator.query, evaluator.gallery
  print(
      f'data: {desc}: {len(query)} queries ({query.num_pids} ids), {len(gallery)} gallery '
      f'images ({gallery.num_pids} ids)',
      flush=True,
  )
  t0 = time.time()
  # the evaluator of the images that could be read: its rows are the features'
  results, qf, gf, kept = evaluator.run_model(loaded, batch_size=FLAGS.batch_size)
  query, gallery = kept.query, kept.gallery
  print(
      f'features and metrics in {time.time() - t0:.1f}s'
      f'{" (re-ranked)" if FLAGS.rerank else ""}\n'
  )
  print(reporting.results_table(results))
  if FLAGS.export_features:
    extra = {'model': os.path.abspath(loaded.weights_path), 'data': desc}
    written = inference.export_features(
        FLAGS.export_features,
        {
            'query': dict(features=qf, paths=query.paths, pids=query.pids, camids=query.camids),
            'gallery': dict(
                features=gf, paths=gallery.paths, pids=gallery.pids, camids=gallery.camids
            ),
        },
        extra,
    )
    res_path = os.path.join(FLAGS.export_features, 'results.json')
    with open(res_path, 'w') as f:
      json.dump({**results, 'rerank': FLAGS.rerank, **extra}, f, indent=2)
    print('\nwrote ' + ', '.join(written + [res_path]))
  return 0


if __name__ == '__main__':
  sys.exit(main())
