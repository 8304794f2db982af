"""Tests of jaxreid.objectives: method formulas, weights as data, extra terms, errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxreid import losses as L
from jaxreid import objectives as O

B, D, C = 16, 8, 10


def make_outputs(seed=0):
  rng = np.random.default_rng(seed)
  out = {
      'labels': np.array([0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 3, -1, 4, 4, 4], np.int32),
      'class_mask': np.arange(C) < 6,
  }
  nets = [
      'student1',
      'teacher1',
      'student2',
      'teacher2',
      'student1/avg',
      'student1/max',
      'teacher1/avg',
      'teacher1/max',
  ]
  for net in nets:
    out[f'{net}/features'] = rng.normal(size=(B, D)).astype(np.float32)
    out[f'{net}/logits'] = (rng.normal(size=(B, C)) * 2).astype(np.float32)
  return {k: jnp.asarray(v) for k, v in out.items()}


def ce(o, net):
  return L.cross_entropy_label_smooth(o[f'{net}/logits'], o['labels'], o['class_mask'])


def tri(o, net):
  return L.softmax_triplet(o[f'{net}/features'], o['labels'])


def sce(o, net, teacher):
  return L.soft_entropy(o[f'{net}/logits'], o[f'{teacher}/logits'], o['class_mask'])


def stri(o, net, teacher):
  return L.soft_softmax_triplet(o[f'{net}/features'], o[f'{teacher}/features'], o['labels'])


def total(method, outputs, weights=None, **kw):
  return float(O.compute_objective(O.build_objective(method, weights, **kw), outputs)[0])


def test_mmt_default_formula():
  o = make_outputs(1)
  expected = 0.0
  for i, j in ((1, 2), (2, 1)):
    s, t = f'student{i}', f'teacher{j}'
    expected += 0.5 * ce(o, s) + 0.2 * tri(o, s) + 0.5 * sce(o, s, t) + 0.8 * stri(o, s, t)
  assert total('mmt', o) == pytest.approx(float(expected), rel=1e-5)
  tot, metrics = O.compute_objective(O.build_objective('mmt'), o)
  assert float(metrics['loss/total']) == pytest.approx(float(tot))
  np.testing.assert_allclose(metrics['loss/soft_tri2'], stri(o, 'student2', 'teacher1'), rtol=1e-6)
  np.testing.assert_allclose(metrics['loss/soft_ce1'], sce(o, 'student1', 'teacher2'), rtol=1e-6)
  for name in ('tri1', 'tri2', 'soft_tri1', 'soft_tri2'):
    assert f'prec/{name}' in metrics and f'anchors/{name}' in metrics
  np.testing.assert_allclose(
      metrics['prec/soft_tri1'], L.triplet_precision(o['student1/features'], o['labels'])
  )
  assert float(metrics['anchors/tri1']) == 15.0  # 16 samples, one noise
  assert 'prec/ce1' not in metrics


def test_mmt_without_soft_terms_is_the_clustering_baseline_on_each_network():
  o = make_outputs(2)
  terms = O.build_objective('mmt', {'soft_ce_weight': 0.0, 'soft_tri_weight': 0.0})
  assert [t.name for t in terms] == ['ce1', 'tri1', 'ce2', 'tri2']
  expected = sum(float(ce(o, s) + tri(o, s)) for s in ('student1', 'student2'))
  assert total('mmt', o, {'soft_ce_weight': 0, 'soft_tri_weight': 0}) == pytest.approx(
      expected, rel=1e-5
  )
  # ... and each half equals the cluster_baseline objective of that network
  base = total('cluster_baseline', o)
  assert base == pytest.approx(float(ce(o, 'student1') + tri(o, 'student1')), rel=1e-5)
  # no teacher outputs needed at all
  no_teacher = {k: v for k, v in o.items() if 'teacher' not in k}
  assert float(O.compute_objective(terms, no_teacher)[0]) == pytest.approx(expected, rel=1e-5)
  assert O.required_keys(terms) == {
      'labels',
      'class_mask',
      'student1/features',
      'student1/logits',
      'student2/features',
      'student2/logits',
  }


def test_mean_teacher_and_pretrain():
  o = make_outputs(3)
  s, t = 'student1', 'teacher1'
  expected = 0.5 * ce(o, s) + 0.2 * tri(o, s) + 0.5 * sce(o, s, t) + 0.8 * stri(o, s, t)
  assert total('mean_teacher', o) == pytest.approx(float(expected), rel=1e-5)
  assert total('pretrain', o) == pytest.approx(float(ce(o, s) + tri(o, s)), rel=1e-5)
  assert total('pretrain', o, {'tri': 0.5}) == pytest.approx(
      float(ce(o, s) + 0.5 * tri(o, s)), rel=1e-5
  )
  eps = 0.2
  expected = L.cross_entropy_label_smooth(o['student1/logits'], o['labels'], o['class_mask'], eps)
  assert total('pretrain', o, {'tri': 0}, label_smoothing=eps) == pytest.approx(
      float(expected), rel=1e-6
  )


def abmt_formula(o):
  s, t = 'student1', 'teacher1'
  l_ce = (ce(o, f'{s}/avg') + ce(o, f'{s}/max')) / 2
  l_sce = (sce(o, f'{s}/avg', f'{t}/max') + sce(o, f'{s}/max', f'{t}/avg')) / 2
  l_stri = (stri(o, f'{s}/avg', f'{t}/max') + stri(o, f'{s}/max', f'{t}/avg')) / 2
  return l_ce, l_sce, l_stri


@pytest.mark.parametrize('seed', [4, 5])
def test_abmt_total_equals_the_paper_formula(seed):
  o = make_outputs(seed)
  l_ce, l_sce, l_stri = abmt_formula(o)
  assert total('abmt', o) == pytest.approx(float((l_ce + l_sce) / 2 + l_stri), rel=1e-5)
  terms = O.build_objective('abmt')
  assert sorted((t.name, t.weight) for t in terms) == sorted(
      [
          ('ce_avg', 0.25),
          ('ce_max', 0.25),
          ('soft_ce_avg', 0.25),
          ('soft_ce_max', 0.25),
          ('soft_tri_avg', 0.5),
          ('soft_tri_max', 0.5),
      ]
  )
  # the paper's ablations are weight changes
  assert total('abmt', o, {'ce': 0}) == pytest.approx(float(l_sce / 2 + l_stri), rel=1e-5)
  assert total('abmt', o, {'soft_ce': 0}) == pytest.approx(float(l_ce / 2 + l_stri), rel=1e-5)
  assert total('abmt', o, {'soft_tri': 0}) == pytest.approx(float((l_ce + l_sce) / 2), rel=1e-5)


def test_zero_weight_terms_are_dropped_and_not_computed():
  o = make_outputs(6)
  terms = O.build_objective('abmt', {'ce': 0.0, 'soft_tri_max': 0.0})
  assert [t.name for t in terms] == ['soft_ce_avg', 'soft_tri_avg', 'soft_ce_max']
  _, metrics = O.compute_objective(terms, o)
  assert set(metrics) == {
      'loss/soft_ce_avg',
      'loss/soft_tri_avg',
      'loss/soft_ce_max',
      'prec/soft_tri_avg',
      'anchors/soft_tri_avg',
      'loss/total',
  }
  # terms built by hand with weight 0 are skipped by compute_objective too (no missing-key error)
  t0 = O.Term('t0', 'softmax_triplet', 0.0, {'features': 'student2/features', 'labels': 'labels'})
  tot, metrics = O.compute_objective((t0,), {})
  assert float(tot) == 0.0 and set(metrics) == {'loss/total'}
  # ABMT's optional hard triplet pair is off by default and can be switched on
  assert 'tri_avg' in [t.name for t in O.build_objective('abmt', {'tri': 0.1})]


def test_weights_by_term_name_and_precedence():
  terms = {
      t.name: t.weight
      for t in O.build_objective(
          'mmt', {'soft_ce_weight': 0.3, 'tri': 0.7, 'tri2': 0.0, 'soft_tri1': 2.0}
      )
  }
  assert terms == pytest.approx(
      {
          'ce1': 0.7,
          'tri1': 0.7,
          'soft_ce1': 0.3,
          'soft_tri1': 2.0,
          'ce2': 0.7,
          'soft_ce2': 0.3,
          'soft_tri2': 0.8,
      }
  )
  names = O.weight_names('mmt')
  assert names['soft_ce_weight'] == 0.5 and names['soft_tri_weight'] == 0.8
  assert names['tri'] == pytest.approx(0.2)


def test_unknown_weight_name_is_rejected():
  with pytest.raises(ValueError, match="'soft_ce_wieght'"):
    O.build_objective('mmt', {'soft_ce_wieght': 0.5})
  with pytest.raises(ValueError, match="'soft_ce'"):
    O.build_objective('pretrain', {'soft_ce': 0.5})
  cfg = ml_collections.ConfigDict({'soft_ce_weight': 0.5, 'sofft_tri_weight': 0.8})
  with pytest.raises(ValueError, match="'sofft_tri_weight'"):
    O.objective_from_config('mmt', cfg)
  with pytest.raises(ValueError, match='unknown method'):
    O.build_objective('mmtt')
  with pytest.raises(ValueError, match='no teacher'):
    O.build_objective('cluster_baseline', {'soft_ce_weight': 0.5})


def test_extra_term_from_a_config_dict_is_applied():
  o = make_outputs(7)
  config = ml_collections.ConfigDict()
  config.loss = ml_collections.ConfigDict()
  config.loss.soft_ce_weight = 0.5
  config.loss.soft_tri_weight = 0.8
  config.loss.extra_terms = [
      dict(
          name='my_tri',
          loss='margin_triplet',
          weight=0.1,
          inputs={'features': 'student1/features', 'labels': 'labels'},
          kwargs={'margin': 0.3},
      )
  ]
  terms = O.objective_from_config('mmt', config.loss)
  assert terms[-1].name == 'my_tri' and dict(terms[-1].kwargs) == {'margin': 0.3}
  tot, metrics = O.compute_objective(terms, o)
  extra = L.margin_triplet(o['student1/features'], o['labels'], margin=0.3)
  np.testing.assert_allclose(metrics['loss/my_tri'], extra, rtol=1e-6)
  assert 'prec/my_tri' in metrics
  assert float(tot) == pytest.approx(total('mmt', o) + 0.1 * float(extra), rel=1e-5)
  # the dict-of-terms form (command-line overridable: --config.loss.extra_terms.my_tri.weight=...)
  config.loss = ml_collections.ConfigDict(dict(soft_ce_weight=0.5, soft_tri_weight=0.8))
  config.loss.extra_terms = {
      'my_tri': dict(
          loss='margin_triplet',
          weight=0.1,
          inputs={'features': 'student1/features', 'labels': 'labels'},
          kwargs={'margin': 0.3},
      )
  }
  assert O.objective_from_config('mmt', config.loss) == terms
  # directly, with build_objective
  assert O.build_objective('mmt', extra_terms=[terms[-1]]) == terms


def test_register_loss_and_custom_extra_term():
  name = 'test_feature_norm'

  def feature_norm(features, target=1.0):
    return jnp.mean((jnp.linalg.norm(features.astype(jnp.float32), axis=-1) - target) ** 2)

  O.register_loss(name, feature_norm, overwrite=True)
  try:
    with pytest.raises(ValueError, match='already registered'):
      O.register_loss(name, feature_norm)
    o = make_outputs(8)
    terms = O.build_objective(
        'pretrain',
        extra_terms=[
            dict(
                name='norm',
                loss=name,
                weight=0.01,
                inputs={'features': 'student1/features'},
                kwargs={'target': 2.0},
            )
        ],
    )
    tot, metrics = jax.jit(lambda out: O.compute_objective(terms, out))(o)
    np.testing.assert_allclose(
        metrics['loss/norm'], feature_norm(o['student1/features'], 2.0), rtol=1e-6
    )
    assert float(tot) == pytest.approx(
        total('pretrain', o) + 0.01 * float(metrics['loss/norm']), rel=1e-5
    )
  finally:
    O.LOSSES.pop(name, None)


def test_build_time_validation():
  good = dict(
      name='x',
      loss='margin_triplet',
      weight=1.0,
      inputs={'features': 'student1/features', 'labels': 'labels'},
  )
  with pytest.raises(ValueError, match="'student3/features'"):
    O.build_objective(
        'pretrain',
        extra_terms=[dict(good, inputs={'features': 'student3/features', 'labels': 'labels'})],
    )
  with pytest.raises(ValueError, match='unknown loss'):
    O.build_objective('pretrain', extra_terms=[dict(good, loss='nope')])
  with pytest.raises(ValueError, match='no argument'):
    O.build_objective('pretrain', extra_terms=[dict(good, kwargs={'margn': 0.1})])
  with pytest.raises(ValueError, match='needs argument'):
    O.build_objective(
        'pretrain', extra_terms=[dict(good, inputs={'features': 'student1/features'})]
    )
  with pytest.raises(ValueError, match='duplicate'):
    O.build_objective('pretrain', extra_terms=[dict(good, name='ce')])
  with pytest.raises(ValueError, match='unknown field'):
    O.build_objective('pretrain', extra_terms=[dict(good, wieght=2.0)])
  # every built-in method only reads documented keys
  for method in O.METHODS:
    for term in O.build_objective(method):
      assert set(term.inputs.values()) <= set(O.OUTPUT_KEYS), (method, term)


def test_missing_output_raises_key_error_naming_term_and_key():
  o = make_outputs(9)
  del o['teacher2/logits']
  with pytest.raises(KeyError, match='soft_ce1.*teacher2/logits'):
    O.compute_objective(O.build_objective('mmt'), o)


def test_compute_objective_is_jit_safe_without_recompilation():
  terms = O.build_objective('abmt')
  traces = []

  def f(out):
    traces.append(1)
    return O.compute_objective(terms, out)

  jf = jax.jit(f)
  for seed in (10, 11, 12):
    o = make_outputs(seed)
    tot, metrics = jf(o)
    assert float(tot) == pytest.approx(total('abmt', o), rel=1e-5)
  assert len(traces) == 1
  assert hash(terms) == hash(O.build_objective('abmt'))  # hashable, usable as a static argument
  # gradients w.r.t. the student only
  o = make_outputs(13)
  floats = {k: v for k, v in o.items() if v.dtype == jnp.float32}
  rest = {k: v for k, v in o.items() if k not in floats}
  g = jax.jit(jax.grad(lambda fl: O.compute_objective(terms, {**fl, **rest})[0]))(floats)
  assert np.any(np.asarray(g['student1/avg/features']) != 0)
  for key in ('teacher1/avg/features', 'teacher1/max/logits'):
    np.testing.assert_array_equal(g[key], 0.0)
  # bfloat16 network outputs
  o16 = {k: v.astype(jnp.bfloat16) if v.dtype == jnp.float32 else v for k, v in o.items()}
  tot16, _ = jf(o16)
  assert tot16.dtype == jnp.float32 and np.isfinite(float(tot16))
