"""The coupling diagnostic (ABMT paper, Fig. 4) on constructed features with known distances."""

from __future__ import annotations

import numpy as np
import pytest

from jaxreid import features


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mean_feature_distance_hand_computed():
  a = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  b = np.array([[0.0, 1.0], [0.0, 1.0], [0.6, -0.8]])
  # sqrt(2), 0 and 1.6, averaged.
  assert features.mean_feature_distance(a, b) == pytest.approx((np.sqrt(2) + 0.0 + 1.6) / 3)
  assert features.mean_feature_distance(a, a) == 0.0
  with pytest.raises(ValueError, match='shapes differ'):
    features.mean_feature_distance(a, b[:2])


def test_identical_networks_have_zero_coupling_distance():
  rng = np.random.default_rng(0)
  f = _unit(rng.normal(size=(50, 8)).astype(np.float32))
  out = features.coupling(
      {
          'teacher/net1': f,
          'teacher/net2': f.copy(),
          'student/net1': f.copy(),
          'student/net2': f.copy(),
      },
      two_branch=False,
  )
  assert out == {
      'coupling/teachers': 0.0,
      'coupling/students': 0.0,
      'coupling/teacher_student': 0.0,
  }


def test_mmt_coupling_pairs_the_right_networks():
  rng = np.random.default_rng(1)
  t1, t2, s1, s2 = (_unit(rng.normal(size=(40, 6))) for _ in range(4))
  out = features.coupling(
      {'teacher/net1': t1, 'teacher/net2': t2, 'student/net1': s1, 'student/net2': s2},
      two_branch=False,
  )
  slow = lambda a, b: np.mean([np.sqrt(np.sum((x - y) ** 2)) for x, y in zip(a, b)])
  assert out['coupling/teachers'] == pytest.approx(slow(t1, t2))
  assert out['coupling/students'] == pytest.approx(slow(s1, s2))
  assert out['coupling/teacher_student'] == pytest.approx((slow(t1, s1) + slow(t2, s2)) / 2)


def test_abmt_coupling_compares_the_two_branches_of_each_network():
  # [avg, max] halves: identical directions -> 0; orthogonal directions -> sqrt(2) after each
  # branch is normalised, whatever the halves' norms.
  same = np.concatenate([np.eye(4), 3.0 * np.eye(4)], axis=1)
  orthogonal = np.concatenate([np.eye(4), 2.0 * np.roll(np.eye(4), 1, axis=1)], axis=1)
  out = features.coupling(
      {'teacher/net1': _unit(same), 'student/net1': _unit(orthogonal)}, two_branch=True
  )
  assert out['coupling/teachers'] == pytest.approx(0.0, abs=1e-12)
  assert out['coupling/students'] == pytest.approx(np.sqrt(2))
  assert out['coupling/teacher_student'] > 0.0


def test_mean_teacher_and_clustering_baseline():
  rng = np.random.default_rng(2)
  t, s = _unit(rng.normal(size=(10, 4))), _unit(rng.normal(size=(10, 4)))
  out = features.coupling({'teacher/net1': t, 'student/net1': s}, two_branch=False)
  assert set(out) == {'coupling/teacher_student'}  # one network pair, nothing else to couple
  assert features.coupling({'student/net1': s}, two_branch=False) == {}


def test_average_features_plain_for_kmeans_renormalised_for_dbscan():
  a = np.array([[1.0, 0.0]], np.float32)
  b = np.array([[0.0, 1.0]], np.float32)
  # The reference's K-means script: (f1 + f2) / 2; its DBSCAN script re-normalises.
  np.testing.assert_allclose(
      features.average_features([a, b], renormalize=False), [[0.5, 0.5]], rtol=1e-6
  )
  np.testing.assert_allclose(
      features.average_features([a, b], renormalize=True), [[2**-0.5, 2**-0.5]], rtol=1e-6
  )
  assert features.average_features([a], renormalize=True) is a
