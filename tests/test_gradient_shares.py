"""Per-term gradient shares (`jaxreid.train.make_gradient_shares`): a hand-computed case, how the
shares follow the weights, terms that cannot train the network, a feature scaled by 1e-3, a
custom loss, and the published OSNet under both heads (docs/reference.md section 1)."""

from __future__ import annotations

import os
from pathlib import Path
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from jaxreid import adapt
from jaxreid import checkpoint
from jaxreid import input_pipeline
from jaxreid import losses
from jaxreid import methods
from jaxreid import models
from jaxreid import train as train_lib

sys.path.insert(0, os.path.dirname(__file__))
import train_fixtures as fx  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / 'shared'
OSNET = SHARED / 'weights' / 'osnet_x0_25_msmt17.pth'
MARKET = SHARED / 'data' / 'market1501'
needs_shared = pytest.mark.skipif(not OSNET.is_file() or not MARKET.is_dir(), reason='no ../shared')


def _shares(method_name, loss=None, seed=0):
  model, spec, _, state, _, data = fx.setup(method_name, seed=seed, augment=False)
  # Random classifier rows (the fixture's one-hot centroids leave ABMT's max classifier at 0)
  rows = np.random.default_rng(seed).standard_normal((fx.NUM_IDS, models.embedding_dim(model)))
  state = state.replace(
      params={n: models.set_classifier_rows(p, rows) for n, p in state.params.items()},
      teacher_params={
          n: models.set_classifier_rows(p, rows) for n, p in state.teacher_params.items()
      },
  )
  fn = train_lib.make_gradient_shares(spec, model, loss=loss, augment=False)
  idx = fx.pk_indices(1, seed)[0]
  return {k: float(v) for k, v in jax.jit(fn)(state, data, idx).items()}, (model, state, data, idx)


def linear_and_quadratic(outputs, labels, weights):
  """Two terms of known gradient in the pooled feature p (ResNet's triplet input is p itself):
  a = w_a sum(p) has gradient w_a (every entry), b = w_b |p|^2 / 2 has gradient w_b p."""
  p = outputs['student1/features']
  return methods.weighted_sum(
      {
          'a': ('a', lambda: jnp.sum(p)),
          'b': ('b', lambda: 0.5 * jnp.sum(jnp.square(p))),
      },
      weights,
  )


def test_shares_equal_the_hand_computed_norms():
  w = {'a': 0.7, 'b': 0.05}
  shares, (model, state, data, idx) = _shares(
      'cluster_baseline', loss=lambda o, lab: linear_and_quadratic(o, lab, w)
  )
  x = input_pipeline.normalize(data.images[idx])
  out, _ = model.apply(state.variables('net1'), x, train=True, mutable=['batch_stats'])
  p = np.asarray(out['features'], np.float64)
  norm_p = np.linalg.norm(p)
  # n_t = |g_t| |p| (one head): |g_a| = w_a sqrt(B C), |g_b| = w_b |p|.
  n_a = w['a'] * np.sqrt(p.size) * norm_p
  n_b = w['b'] * norm_p * norm_p
  assert shares['a'] == pytest.approx(n_a / (n_a + n_b), rel=1e-4)
  assert shares['b'] == pytest.approx(n_b / (n_a + n_b), rel=1e-4)
  assert shares['other'] < 1e-5  # nothing beyond the named terms


def test_shares_sum_to_one_and_follow_a_weight():
  base_shares, _ = _shares('mmt')
  names = {'ce1', 'ce2', 'tri1', 'tri2', 'soft_ce1', 'soft_ce2', 'soft_tri1', 'soft_tri2'}
  assert names <= set(base_shares)
  assert sum(base_shares.values()) == pytest.approx(1.0, abs=1e-5)
  # Three times tri1's weight triples its gradient and nothing else's (hand rule for the shares).
  spec = methods.get('mmt')
  tripled = methods.objective(spec, {'tri1': 3 * 0.2})
  shares, _ = _shares('mmt', loss=tripled)
  scaled = {t: s * (3.0 if t == 'tri1' else 1.0) for t, s in base_shares.items()}
  total = sum(scaled.values())
  for t in names:
    assert shares[t] == pytest.approx(scaled[t] / total, rel=1e-3, abs=1e-6), t


def scaled_triplet_loss(outputs, labels, weights):
  """The clustering baseline's CE + softmax triplet, the triplet reading features times
  `weights['feature_scale']` (a mis-scaled input, as the pre-BN OSNet feature was)."""
  f = outputs['student1/features'] * weights['feature_scale']
  logits = outputs['student1/logits']
  return methods.weighted_sum(
      {
          'ce': (
              'ce',
              lambda: losses.cross_entropy_label_smooth(logits, labels.ids, labels.class_mask),
          ),
          'tri': ('tri', lambda: losses.softmax_triplet(f, labels.ids)),
      },
      weights,
  )


@pytest.mark.parametrize('scale, flagged', [(1.0, []), (1e-3, ['tri'])])
def test_a_feature_scaled_by_1e_3_is_flagged(scale, flagged):
  w = {'ce': 1.0, 'tri': 1.0, 'feature_scale': scale}
  shares, _ = _shares('cluster_baseline', loss=lambda o, lab: scaled_triplet_loss(o, lab, w))
  warnings = train_lib.low_share_warnings(shares)
  assert [line.split()[0] for line in warnings] == flagged
  for line in warnings:
    assert 'of the gradient: its input may be mis-scaled' in line


def teacher_only_term(outputs, labels, weights):
  """MMT plus a term on the teachers' outputs only: it cannot train anything."""
  total, metrics = methods.mmt_loss(outputs, labels, weights)
  value = 0.5 * jnp.mean(jnp.square(outputs['teacher1/features']))
  metrics['weighted/teacher_only'] = value
  return total + value, metrics


def unnamed_extra_term(outputs, labels, weights):
  """MMT plus a term the loss does not name (no `weighted/` metric): reported as 'other'."""
  total, metrics = methods.mmt_loss(outputs, labels, weights)
  extra = losses.margin_triplet(outputs['student1/features'], labels.ids, margin=0.3)
  return total + 2.0 * extra, metrics


def test_custom_terms_are_named_or_other_and_dead_terms_flagged():
  weights = methods.resolve_weights(methods.get('mmt'), {})
  shares, _ = _shares('mmt', loss=lambda o, lab: teacher_only_term(o, lab, weights))
  assert shares['teacher_only'] == 0.0
  assert any(
      w.startswith('teacher_only carries 0.0%') for w in train_lib.low_share_warnings(shares)
  )
  shares, _ = _shares('mmt', loss=lambda o, lab: unnamed_extra_term(o, lab, weights))
  reported = train_lib.reported_shares(shares)
  assert reported['other'] > 0.01
  assert sum(reported.values()) == pytest.approx(1.0, abs=1e-5)
  # 'other' is rounding when the loss names every term, and then not reported
  shares, _ = _shares('mmt')
  assert 'other' not in train_lib.reported_shares(shares)


def test_abmt_shares_cover_both_branches():
  shares, _ = _shares('abmt')
  terms = {t for t in shares if t != 'other'}
  assert terms == {f'{g}_{b}' for g in ('ce', 'soft_ce', 'soft_tri') for b in ('avg', 'max')}
  assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
  assert all(shares[t] > 0 for t in terms)


# ----------------------------------------------------------------------------------------------
# The published OSNet: today's mapping leaves the triplet terms inert, the default does not


def _market_pk_batch(ids=8, k=4, seed=0):
  from jaxreid.data import readers

  ds = readers.read_market1501(str(MARKET))
  rng = np.random.default_rng(seed)
  pids = ds.train.pids
  chosen = rng.choice(np.unique(pids), ids, replace=False)
  paths, labels = [], []
  for label, pid in enumerate(chosen):
    idx = rng.choice(np.flatnonzero(pids == pid), k, replace=False)
    paths += [ds.train.paths[i] for i in idx]
    labels += [label] * k
  return input_pipeline.decode_images(paths, 128, 64, progress=False), np.asarray(labels)


@needs_shared
@pytest.mark.parametrize('head', ['fc_pre_bn', 'bnneck'])
def test_published_osnet_triplet_terms_are_flagged_only_under_the_pre_bn_mapping(head):
  images, labels = _market_pk_batch()
  c = base.get_config('mmt')
  c.data.height, c.data.width, c.data.crop_pad = 128, 64, 5
  c.model.backbone, c.model.head = 'osnet_x0_25', head
  model = models.create_model(c.model, num_classes=1)
  v = checkpoint.load_weights(str(OSNET), model, drop_classifier=True)
  shares = adapt.gradient_shares_on(c, [v, v], images, labels)
  flagged = sorted(line.split()[0] for line in train_lib.low_share_warnings(shares))
  triplet = sum(shares[t] for t in ('tri1', 'tri2', 'soft_tri1', 'soft_tri2'))
  if head == 'fc_pre_bn':
    # MMT's soft softmax-triplet (its defining loss) is flagged; the hard triplet sits at about
    # the 1% line: the triplet terms together carry a few percent.
    assert flagged == ['soft_tri1', 'soft_tri2']
    assert triplet < 0.05
  else:
    assert flagged == []
    assert triplet > 0.5


def test_a_custom_loss_from_the_config_gets_shares_for_its_own_terms():
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import extra_loss_example

  config = extra_loss_example.get_config()
  config.loss.margin_tri = 0.5
  _, loss = methods.from_config(config)
  reported = train_lib.reported_shares(_shares('mmt', loss=loss)[0])
  assert {'margin_tri/student1', 'margin_tri/student2', 'soft_tri1', 'ce2'} <= set(reported)
  assert 'other' not in reported  # the example names its term
  assert sum(reported.values()) == pytest.approx(1.0, abs=1e-4)
