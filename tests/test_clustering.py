"""Tests for jaxreid.pseudo_labels against dense references (docs/reference.md sections 3, 4)."""

import ml_collections
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score

from jaxreid import config_checks
from jaxreid import pseudo_labels as C
from jaxreid import retrieval as R


def dense_eps(dist, rho):
  """MMT's heuristic on the dense matrix, literally."""
  tri = np.triu(dist, 1)
  tri = tri[np.nonzero(tri)]
  tri = np.sort(tri, axis=None)
  top_num = np.round(rho * tri.size).astype(int)
  return tri[:top_num].mean()


def features(seed, n=300, d=32, n_clusters=40, noise=0.4, dup=10):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((n_clusters, d))
  lab = rng.integers(0, n_clusters, n)
  x = centres[lab] + noise * rng.standard_normal((n, d))
  if dup:
    x[-dup:] = x[:dup]  # exact duplicates: stored zero distances off the diagonal
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), lab


@pytest.fixture(scope='module')
def graphs():
  x, _ = features(0)
  src, _ = features(1, n=120, dup=0)
  return {
      'plain': R.jaccard_distance(x),
      'mixed': R.jaccard_distance(x, source_features=src, lam=0.1),
  }


@pytest.mark.parametrize('kind', ['plain', 'mixed'])
@pytest.mark.parametrize('rho', [1.6e-3, 2e-3, 0.02, 0.3, 0.9])
def test_estimate_eps_matches_dense_heuristic(graphs, kind, rho):
  g = graphs[kind]
  dense = g.to_dense().astype(np.float64)
  assert C.estimate_eps(g, rho) == pytest.approx(dense_eps(dense, rho), rel=1e-9, abs=1e-12)


def test_graph_has_stored_zeros_off_diagonal(graphs):
  m = graphs['plain'].matrix.tocoo()
  off_zero = (m.data == 0) & (m.row != m.col)
  assert off_zero.sum() >= 20  # the duplicated features


@pytest.mark.parametrize('kind', ['plain', 'mixed'])
def test_dbscan_sparse_equals_dense(graphs, kind):
  g = graphs[kind]
  dense = g.to_dense().astype(np.float64)
  lo, hi = g.implicit_bounds()
  diag = np.diag(dense)
  eps_list = [C.estimate_eps(g, r) for r in (1.6e-3, 2e-3, 0.02, 0.1)]
  eps_list += [0.5 * (lo + hi), hi + 0.01, 1e-6]
  if kind == 'mixed':
    eps_list.append(float(np.median(diag)))  # some points are not their own neighbour
  seen_clusters = 0
  for eps in eps_list:
    for ms in (4, 2):
      ref = DBSCAN(eps=eps, min_samples=ms, metric='precomputed').fit(dense).labels_
      got = C.dbscan(g, eps, min_samples=ms)
      np.testing.assert_array_equal(got, ref, err_msg=f'eps={eps} min_samples={ms}')
      seen_clusters = max(seen_clusters, got.max() + 1)
  assert seen_clusters > 5


def test_dbscan_missing_diagonal_entries(graphs):
  # A point with an empty V row has d(i, i) = 1 (implicit) in the dense matrix, not 0.
  g = graphs['plain']
  coo = g.matrix.tocoo()
  drop = (coo.row == coo.col) & (coo.row % 7 == 0)
  mat = sp.csr_matrix((coo.data[~drop], (coo.row[~drop], coo.col[~drop])), shape=coo.shape)
  g2 = R.JaccardGraph(matrix=mat)
  dense = g2.to_dense().astype(np.float64)
  assert dense[0, 0] == 1.0
  for eps in (C.estimate_eps(g2, 2e-3), 0.5, 1.0):
    ref = DBSCAN(eps=eps, min_samples=4, metric='precomputed').fit(dense).labels_
    np.testing.assert_array_equal(C.dbscan(g2, eps), ref)


def test_kmeans_jax_recovers_separated_clusters_and_agrees_with_sklearn():
  rng = np.random.default_rng(0)
  centres = 10 * rng.standard_normal((8, 16))
  true = np.repeat(np.arange(8), 50)
  x = (centres[true] + rng.standard_normal((400, 16))).astype(np.float32)
  lab, cen = C.kmeans(x, 8, seed=0, block_size=128)
  assert lab.shape == (400,) and cen.shape == (8, 16) and cen.dtype == np.float32
  assert adjusted_rand_score(true, lab) == pytest.approx(1.0)
  lab_sk, _ = C.kmeans(x, 8, seed=0, backend='sklearn')
  assert adjusted_rand_score(lab_sk, lab) == pytest.approx(1.0)
  np.testing.assert_allclose(cen, C.centroids(x, lab, 8), atol=1e-4)
  lab2, _ = C.kmeans(x, 8, seed=1, n_init=2)
  assert adjusted_rand_score(true, lab2) == pytest.approx(1.0)


def test_centroids_relabel():
  x = np.arange(12, dtype=np.float32).reshape(6, 2)
  labels = np.array([5, -1, 5, 9, 9, 9])
  rl = C.relabel_contiguous(labels)
  np.testing.assert_array_equal(rl, [0, -1, 0, 1, 1, 1])
  cen = C.centroids(x, rl, 3)
  np.testing.assert_allclose(cen, [[2, 3], [8, 9], [0, 0]])


def test_cluster_stats_by_hand():
  pred = np.array([0, 0, 0, 1, 1, 2, -1, -1])
  true = np.array([7, 7, 8, 8, 8, 9, 9, 7])
  st = C.cluster_stats(pred, true)
  assert st['num_clusters'] == 3 and st['noise_fraction'] == pytest.approx(0.25)
  assert st['num_samples'] == 8 and st['singletons'] == 1 and st['largest_cluster'] == 3
  assert st['median_cluster'] == 2.0  # sizes 3, 2, 1
  # clustered samples: cluster0 {7,7,8}, cluster1 {8,8}, cluster2 {9}
  assert st['purity'] == pytest.approx((2 + 2 + 1) / 6)
  # same-cluster pairs: C(3,2)+C(2,2)+0 = 4; correct: (7,7) + (8,8) = 2
  # same-true pairs among clustered: true 7: 2 -> 1, 8: 3 -> 3, 9: 1 -> 0 => 4
  assert st['pairwise_precision'] == pytest.approx(2 / 4)
  assert st['pairwise_recall'] == pytest.approx(2 / 4)
  assert st['pairwise_fscore'] == pytest.approx(0.5)
  # NMI by hand on the 6 clustered samples
  a = pred[:6]
  t = true[:6]
  n = 6
  ca, ct = np.unique(a, return_counts=True)[1], np.unique(t, return_counts=True)[1]
  h_a = -np.sum(ca / n * np.log(ca / n))
  h_t = -np.sum(ct / n * np.log(ct / n))
  mi = 0.0
  for i in np.unique(a):
    for j in np.unique(t):
      nij = np.sum((a == i) & (t == j))
      if nij:
        mi += nij / n * np.log(n * nij / (np.sum(a == i) * np.sum(t == j)))
  assert st['nmi'] == pytest.approx(mi / ((h_a + h_t) / 2))
  keys = ('num_samples', 'num_clusters', 'noise_fraction', 'largest_cluster', 'median_cluster')
  keys += ('singletons',)
  assert C.cluster_stats(pred) == {k: st[k] for k in keys}


def test_generate_both_methods():
  x, true = features(3, n=240, n_clusters=20, noise=0.3, dup=0)
  cc = ml_collections.ConfigDict(
      dict(
          method='dbscan',
          num_clusters=20,
          k1=20,
          k2=6,
          lam=0.0,
          rho=2e-3,
          eps_every_epoch=False,
          min_samples=4,
          kmeans_backend='jax',
      )
  )
  lab, eps, info = C.generate(cc, x, seed=0)
  assert eps > 0 and info['eps'] == eps and info['cluster_seconds'] >= 0
  assert lab.dtype == np.int64 and set(np.unique(lab[lab >= 0])) == set(range(lab.max() + 1))
  assert C.cluster_stats(lab, true)['pairwise_precision'] > 0.9
  # A given eps is kept (MMT fixes it at the first epoch) unless it is re-estimated every epoch.
  assert C.generate(cc, x, seed=0, eps=eps / 2)[1] == eps / 2
  cc.eps_every_epoch = True
  assert C.generate(cc, x, seed=0, eps=eps / 2)[1] == eps
  cc.method = 'kmeans'
  lab_k, eps_k, info_k = C.generate(cc, x, seed=1, eps=eps)
  assert eps_k == eps and 'eps' not in info_k and lab_k.min() == 0 and lab_k.max() < 20
  np.testing.assert_array_equal(lab_k, C.relabel_contiguous(C.kmeans(x, 20, seed=1)[0]))
  assert C.cluster_stats(lab_k, true)['nmi'] > 0.8
  # config.cluster.kmeans_n_init: the best of n k-means++ starts, as kmeans(n_init=n) gives
  cc.kmeans_n_init = 3
  np.testing.assert_array_equal(
      C.generate(cc, x, seed=1)[0], C.relabel_contiguous(C.kmeans(x, 20, seed=1, n_init=3)[0])
  )
  cc.method = 'spectral'
  with pytest.raises(config_checks.ConfigError, match="'spectral'"):
    C.generate(cc, x, seed=0)
