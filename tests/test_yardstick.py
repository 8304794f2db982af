"""The built-in synthetic world as a yardstick, in miniature: the default MMT experiment
(configs/mmt.py, seed 1) with a shorter adaptation and a smaller test split must raise the target
mAP above its source-only start. A change that breaks adaptation (a loss, the pseudo labels, the
training loop, the world) fails here, where a unit test of one part would not notice.

The full default's gain on each seed is measured in experiments/results_synthetic.md; this budget
keeps the part of the gain that a broken method cannot show.
"""

from __future__ import annotations

import os

from configs import mmt as mmt_config
from jaxreid import run as run_lib

# The default pre-training (two source models, 10 x 30 steps), adaptation cut to its first two
# epochs, the target test split to 100 identities (the training identities are the default's).
TINY = {
    'data.synthetic.num_test_ids': 100,
    'pretrain.eval_every': 0,
    'train.epochs': 2,
    'train.eval_every': 2,
    'train.coupling': False,
}


def tiny_config():
  c = mmt_config.get_config()
  c.update_from_flattened_dict(TINY)
  return c


def test_mmt_adapts_on_the_default_world(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXREID_DATA_CACHE', str(tmp_path / 'data'))
  summary = run_lib.train_and_evaluate(tiny_config(), os.fspath(tmp_path / 'run'))
  before, after = summary['source only'], summary['mmt (adapted)']
  assert after['num_queries'] >= 200  # the test split is the one configured, not a stub
  assert after['mAP'] > before['mAP'], (before, after)
