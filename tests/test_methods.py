"""Tests of jaxreid.methods: each method's loss against its paper formula written out here from
the elementary losses, weights and ablations, a loss of your own from a config, errors."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import abmt as abmt_config
from configs import mmt as mmt_config
from jaxreid import losses as L
from jaxreid import methods as M
from jaxreid import train as train_lib
from jaxreid.config_checks import ConfigError

B, D, C = 16, 8, 10
LABELS = M.Labels(
    jnp.array([0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 3, -1, 4, 4, 4], jnp.int32), jnp.arange(C) < 6
)
NETS = ('student1', 'teacher1', 'student2', 'teacher2')
BRANCHES = ('student1/avg', 'student1/max', 'teacher1/avg', 'teacher1/max')


def make_outputs(seed=0, nets=NETS + BRANCHES):
  rng = np.random.default_rng(seed)
  out = {}
  for net in nets:
    out[f'{net}/features'] = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    out[f'{net}/logits'] = jnp.asarray(rng.normal(size=(B, C)) * 2, jnp.float32)
  return out


def ce(o, net, eps=0.1):
  return L.cross_entropy_label_smooth(o[f'{net}/logits'], LABELS.ids, LABELS.class_mask, eps)


def tri(o, net):
  return L.softmax_triplet(o[f'{net}/features'], LABELS.ids)


def sce(o, net, teacher):
  return L.soft_entropy(o[f'{net}/logits'], o[f'{teacher}/logits'], LABELS.class_mask)


def stri(o, net, teacher):
  return L.soft_softmax_triplet(o[f'{net}/features'], o[f'{teacher}/features'], LABELS.ids)


def total(method, outputs, **weights):
  loss = M.objective(M.get(method), weights)
  return float(loss(outputs, LABELS)[0])


def loss_terms(method, outputs, **weights):
  _, metrics = M.objective(M.get(method), weights)(outputs, LABELS)
  return sorted(k[5:] for k in metrics if k.startswith('loss/') and k != 'loss/total')


def test_mmt_default_formula_and_metrics():
  o = make_outputs(1)
  expected = 0.0
  for i, j in ((1, 2), (2, 1)):
    s, t = f'student{i}', f'teacher{j}'
    expected += 0.5 * ce(o, s) + 0.2 * tri(o, s) + 0.5 * sce(o, s, t) + 0.8 * stri(o, s, t)
  assert total('mmt', o) == pytest.approx(float(expected), rel=1e-5)
  tot, metrics = M.objective(M.get('mmt'))(o, LABELS)
  assert float(metrics['loss/total']) == pytest.approx(float(tot))
  # soft_tri2 is student 2 supervised by teacher 1, soft_ce1 student 1 by teacher 2
  np.testing.assert_allclose(metrics['loss/soft_tri2'], stri(o, 'student2', 'teacher1'), rtol=1e-6)
  np.testing.assert_allclose(metrics['loss/soft_ce1'], sce(o, 'student1', 'teacher2'), rtol=1e-6)
  np.testing.assert_allclose(
      metrics['prec/student1'], L.triplet_precision(o['student1/features'], LABELS.ids)
  )
  assert float(metrics['anchors']) == 15.0  # 16 samples, one noise


def test_mmt_without_soft_terms_is_the_clustering_baseline_on_each_network():
  o = make_outputs(2)
  w = dict(soft_ce_weight=0.0, soft_tri_weight=0.0)
  assert loss_terms('mmt', o, **w) == ['ce1', 'ce2', 'tri1', 'tri2']
  expected = sum(float(ce(o, s) + tri(o, s)) for s in ('student1', 'student2'))
  assert total('mmt', o, **w) == pytest.approx(expected, rel=1e-5)
  assert total('cluster_baseline', o) == pytest.approx(
      float(ce(o, 'student1') + tri(o, 'student1')), rel=1e-5
  )
  # Terms of weight 0 are not computed: no teacher output is needed at all.
  students = {k: v for k, v in o.items() if 'teacher' not in k}
  assert total('mmt', students, **w) == pytest.approx(expected, rel=1e-5)


def test_mean_teacher_and_pretrain():
  o = make_outputs(3)
  s, t = 'student1', 'teacher1'
  expected = 0.5 * ce(o, s) + 0.2 * tri(o, s) + 0.5 * sce(o, s, t) + 0.8 * stri(o, s, t)
  assert total('mean_teacher', o) == pytest.approx(float(expected), rel=1e-5)
  assert total('pretrain', o) == pytest.approx(float(ce(o, s) + tri(o, s)), rel=1e-5)
  assert total('pretrain', o, tri=0.5) == pytest.approx(float(ce(o, s) + 0.5 * tri(o, s)), rel=1e-5)
  assert total('pretrain', o, tri=0, label_smoothing=0.2) == pytest.approx(
      float(ce(o, s, eps=0.2)), rel=1e-6
  )


def test_pretrain_of_the_two_branch_network_averages_the_branches():
  o = make_outputs(6, nets=('student1/avg', 'student1/max'))
  expected = sum(0.5 * (ce(o, f'student1/{b}') + tri(o, f'student1/{b}')) for b in ('avg', 'max'))
  assert total('pretrain', o) == pytest.approx(float(expected), rel=1e-5)
  assert loss_terms('pretrain', o) == ['ce_avg', 'ce_max', 'tri_avg', 'tri_max']
  # a branch's term named explicitly takes its absolute weight
  expected = ce(o, 'student1/avg') + 0.5 * tri(o, 'student1/avg') + 0.5 * tri(o, 'student1/max')
  assert total('pretrain', o, ce_avg=1.0, ce_max=0.0) == pytest.approx(float(expected), rel=1e-5)


def abmt_formula(o):
  s, t = 'student1', 'teacher1'
  l_ce = (ce(o, f'{s}/avg') + ce(o, f'{s}/max')) / 2
  l_sce = (sce(o, f'{s}/avg', f'{t}/max') + sce(o, f'{s}/max', f'{t}/avg')) / 2
  l_stri = (stri(o, f'{s}/avg', f'{t}/max') + stri(o, f'{s}/max', f'{t}/avg')) / 2
  return l_ce, l_sce, l_stri


@pytest.mark.parametrize('seed', [4, 5])
def test_abmt_total_equals_the_paper_formula_and_its_ablations(seed):
  o = make_outputs(seed, nets=BRANCHES)
  l_ce, l_sce, l_stri = abmt_formula(o)
  assert total('abmt', o) == pytest.approx(float((l_ce + l_sce) / 2 + l_stri), rel=1e-5)
  assert loss_terms('abmt', o) == [
      'ce_avg',
      'ce_max',
      'soft_ce_avg',
      'soft_ce_max',
      'soft_tri_avg',
      'soft_tri_max',
  ]
  assert total('abmt', o, ce=0) == pytest.approx(float(l_sce / 2 + l_stri), rel=1e-5)
  assert total('abmt', o, soft_ce=0) == pytest.approx(float(l_ce / 2 + l_stri), rel=1e-5)
  assert total('abmt', o, soft_tri=0) == pytest.approx(float((l_ce + l_sce) / 2), rel=1e-5)
  assert 'tri_avg' in loss_terms('abmt', o, tri=0.1)


def test_a_term_weight_overrides_its_group_and_mmt_groups_override_the_parameters():
  o = make_outputs(7)
  s1, s2 = 'student1', 'student2'
  base = total('mmt', o)
  # MMT without the hard triplet: the soft triplet keeps its derived 0.8
  assert total('mmt', o, tri=0.0) == pytest.approx(
      base - 0.2 * float(tri(o, s1) + tri(o, s2)), rel=1e-5
  )
  # one term by name, the rest from the group / parameters
  assert total('mmt', o, tri=0.0, tri2=1.0) == pytest.approx(
      base - 0.2 * float(tri(o, s1)) + 0.8 * float(tri(o, s2)), rel=1e-5
  )


def test_unknown_or_bad_weights_are_config_errors_naming_the_key():
  with pytest.raises(ConfigError, match=r"config\.loss: unknown weight name\(s\) \['sof_tri'\]"):
    M.objective(M.get('abmt'), {'sof_tri': 0.0})
  with pytest.raises(ConfigError, match=r'config\.loss\.tri: must be a number'):
    M.objective(M.get('mmt'), {'tri': 'x'})
  with pytest.raises(ConfigError, match=r'config\.loss\.ce: must be finite'):
    M.objective(M.get('mmt'), {'ce': float('nan')})
  with pytest.raises(ValueError, match='unknown method'):
    M.get('mmmt')


def test_a_loss_of_your_own_from_the_config_adds_a_term():
  # experiments/extra_loss_example.py: MMT + margin_tri x a margin triplet per student. Its
  # function is imported by name, as from the repository root (`python -m jaxreid.main`).
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import extra_loss_example

  config = extra_loss_example.get_config()
  config.loss.margin_tri = 0.3
  config.loss.tri = 0.0  # a method weight still applies
  method, loss = M.from_config(config)
  assert method.name == 'mmt'
  o = make_outputs(8)
  tot, metrics = jax.jit(loss)(o, LABELS)
  extra = sum(L.margin_triplet(o[f'student{i}/features'], LABELS.ids, 0.3) for i in (1, 2))
  assert float(tot) == pytest.approx(total('mmt', o, tri=0.0) + 0.3 * float(extra), rel=1e-5)
  assert float(metrics['loss/total']) == pytest.approx(float(tot))
  assert 'loss/margin_tri/student2' in metrics and 'loss/tri1' not in metrics
  # without the function, the new field is an unknown weight name
  config.loss.function = ''
  with pytest.raises(ConfigError, match='margin_tri'):
    M.from_config(config)
  config.loss.function = 'experiments.extra_loss_example:nope'
  with pytest.raises(ConfigError, match='config.loss.function: cannot import'):
    M.from_config(config)
  config.loss.function = 'no_colon'
  with pytest.raises(ConfigError, match="'package.module:function'"):
    M.from_config(config)


def test_the_config_swaps_the_loss_function_of_a_training_step():
  # The trainer calls the given function with every network's outputs; a loss that is 0 gives
  # zero gradients.
  sys.path.insert(0, os.path.dirname(__file__))
  import train_fixtures as F

  calls = []

  def zero_loss(outputs, labels, weights):
    calls.append(sorted(outputs))
    return jnp.zeros(()), {'loss/total': jnp.zeros(())}

  method = M.get('mmt')
  model, _, tx, state, _, data = F.setup('mmt')
  step = train_lib.make_train_step(method, model, tx, loss=lambda o, lab: zero_loss(o, lab, {}))
  new_state, metrics = jax.jit(step)(state, data, jnp.arange(8), jnp.arange(8))
  assert calls and 'teacher2/logits' in calls[0] and 'student1/features' in calls[0]
  assert float(metrics['loss/total']) == 0.0 and float(metrics['grad_norm']) == 0.0
  assert int(new_state.step) == 1


def test_the_loss_is_traced_once_whatever_the_labels():
  traces = []
  loss = M.objective(M.get('abmt'))

  @jax.jit
  def f(o, labels):
    traces.append(1)
    return loss(o, labels)[0]

  o = make_outputs(9, nets=BRANCHES)
  for k in range(3):
    labels = M.Labels(jnp.roll(LABELS.ids, k), jnp.arange(C) < 6 - k)
    f(o, labels)
  assert len(traces) == 1


def test_every_method_is_consistent():
  for name, method in M.METHODS.items():
    assert method.name == name
    assert len(method.student_views) == method.num_students
    assert len(method.teacher_views) == (method.num_students if method.ema else 0)
    assert 'label_smoothing' in method.weights
  assert M.get('abmt').arch == 'abmt' and M.get('mmt').networks == ('net1', 'net2')
  assert abmt_config.get_config().model.arch == M.get('abmt').arch
  assert mmt_config.get_config().loss.soft_tri_weight is None  # the method's default applies
  assert M.get('mmt').weights['soft_tri_weight'] == 0.8
