"""Tests for jaxreid.retrieval: evaluation protocol, Jaccard distance, re-ranking.

The references here are deliberately slow and literal (a loop per query; dense N x N matrices
following docs/reference.md section 4 step by step, in float64) so they are independent of the vectorised,
sparse implementation under test.
"""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import average_precision_score

from jaxreid import retrieval as R
from jaxreid.retrieval import distances

# ------------------------------------------------------------------ slow references


def slow_evaluate(dist, q_pids, g_pids, q_cams, g_cams, topk=(1, 5, 10)):
  aps, firsts = [], []
  for i in range(dist.shape[0]):
    order = np.argsort(dist[i], kind='stable')
    valid = (g_pids[order] != q_pids[i]) | (g_cams[order] != q_cams[i])
    match = (g_pids[order] == q_pids[i])[valid]
    if not match.any():
      continue
    d = dist[i][order][valid]
    aps.append(average_precision_score(match, -d))
    firsts.append(np.nonzero(match)[0][0])
    # cumulative-sum AP agrees with sklearn without ties
    hits = np.cumsum(match)
    ap_cs = np.mean(hits[match] / (np.nonzero(match)[0] + 1.0))
    assert abs(ap_cs - aps[-1]) < 1e-9
  firsts = np.array(firsts)
  out = {'mAP': 100 * np.mean(aps), 'num_valid_queries': len(aps)}
  for k in topk:
    out[f'top{k}'] = 100 * np.mean(firsts < k)
  return out


def dense_v(o, k1, k2):
  """V after query expansion, from a normalised original-distance matrix o (N x N)."""
  n = o.shape[0]
  rank = np.argsort(o, axis=1, kind='stable')

  def recip(i, k):
    return np.array([j for j in rank[i, : k + 1] if i in rank[j, : k + 1]], dtype=int)

  kh = int(np.around(k1 / 2.0))
  v = np.zeros((n, n))
  for i in range(n):
    ri = recip(i, k1)
    members = list(ri)
    for c in ri:
      rc = recip(c, kh)
      if len(np.intersect1d(rc, ri)) > 2.0 / 3.0 * len(rc):
        members.extend(rc)
    members = np.unique(np.asarray(members, dtype=int))
    w = np.exp(-o[i, members])
    v[i, members] = w / w.sum()
  if k2 != 1:
    v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
  return v


def dense_jaccard_rows(v, rows):
  m = np.stack([np.minimum(v[i][None, :], v).sum(1) for i in rows])
  return 1.0 - m / (2.0 - m), m


def dense_train_jaccard(x, k1=20, k2=6, source=None, lam=0.0):
  """compute_jaccard_dist, literally: 2|x_i|^2 - 2 x_i.x_j, / column max, transpose."""
  x = x.astype(np.float64)
  n = x.shape[0]
  o = 2.0 * (x**2).sum(1, keepdims=True) - 2.0 * x @ x.T
  o = (o / o.max(0)).T
  v = dense_v(o, k1, k2)
  jac, m = dense_jaccard_rows(v, range(n))
  jac[jac < 0] = 0.0
  if lam > 0:
    s = source.astype(np.float64)
    d = (x**2).sum(1)[:, None] + (s**2).sum(1)[None, :] - 2 * x @ s.T
    sv = (1 - np.exp(-d)).min(1)
    sv /= sv.max()
    return jac * (1 - lam) + (sv[:, None] + sv[None, :]) * lam, m
  return jac, m


def dense_rerank(q, g, k1=20, k2=6, lam=0.3, square=True):
  """re_ranking(q_g, q_q, g_g) on squared-Euclidean inputs, literally."""
  q = q.astype(np.float64)
  g = g.astype(np.float64)

  def sq(a, b):
    return (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T

  nq = q.shape[0]
  o = np.block([[sq(q, q), sq(q, g)], [sq(g, q), sq(g, g)]])
  if square:
    o = np.power(o, 2)
  o = (o / o.max(0)).T
  v = dense_v(o, k1, k2)
  jac, _ = dense_jaccard_rows(v, range(nq))
  final = jac * (1 - lam) + o[:nq] * lam
  return final[:, nq:]


def clustered_features(rng, n, d=32, n_clusters=30, noise=0.35, unit=True):
  centres = rng.standard_normal((n_clusters, d))
  labels = rng.integers(0, n_clusters, n)
  x = centres[labels] + noise * rng.standard_normal((n, d))
  if unit:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), labels


# ------------------------------------------------------------------ evaluation


def random_problem(rng, nq=60, ng=500, n_ids=40, n_cams=6):
  q_pids = rng.integers(1, n_ids, nq)
  q_cams = rng.integers(0, n_cams, nq)
  g_pids = rng.integers(0, n_ids, ng)  # pid 0 = distractors, gallery only
  g_cams = rng.integers(0, n_cams, ng)
  # a query identity absent from the gallery, and one present only in the query's camera
  g_pids[g_pids == q_pids[0]] = 0
  g_cams[g_pids == q_pids[1]] = q_cams[1]
  return q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize('seed,shift', [(0, 0.0), (1, 0.0), (2, -0.5)])
def test_evaluate_distances_matches_slow_loop_and_sklearn(seed, shift):
  rng = np.random.default_rng(seed)
  q_pids, g_pids, q_cams, g_cams = random_problem(rng)
  dist = rng.random((q_pids.size, g_pids.size)).astype(np.float32)
  # make true matches somewhat closer so CMC is not trivial
  dist[q_pids[:, None] == g_pids[None, :]] *= 0.6
  dist += np.float32(shift)  # negative distances must order correctly too (int32 keys)
  if shift:
    dist[0, :3] = [-0.0, 0.0, -1e-30]
  ref = slow_evaluate(dist, q_pids, g_pids, q_cams, g_cams)
  got = R.market_metrics_from_distances(dist, q_pids, g_pids, q_cams, g_cams, block_size=16)
  assert got['num_valid_queries'] == ref['num_valid_queries'] < q_pids.size
  for key in ('mAP', 'top1', 'top5', 'top10'):
    assert got[key] == pytest.approx(ref[key], abs=1e-9), key
  assert got['num_queries'] == q_pids.size


def test_evaluate_features_matches_distances():
  rng = np.random.default_rng(3)
  q_pids, g_pids, q_cams, g_cams = random_problem(rng, nq=40, ng=300)
  qf = rng.standard_normal((40, 16)).astype(np.float32)
  gf = rng.standard_normal((300, 16)).astype(np.float32)
  d = R.squared_distance(qf, gf, block_size=16)
  d64 = ((qf.astype(np.float64)[:, None] - gf[None]) ** 2).sum(-1)
  np.testing.assert_allclose(d, d64, rtol=1e-5, atol=1e-4)
  got = R.market_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, block_size=16, topk=(1, 3))
  ref = slow_evaluate(d64, q_pids, g_pids, q_cams, g_cams, topk=(1, 3))
  assert set(got) == {'mAP', 'top1', 'top3', 'num_valid_queries', 'num_queries'}
  for key in ('mAP', 'top1', 'top3'):
    assert got[key] == pytest.approx(ref[key], abs=1e-9)
  text = R.format_results(got, title='toy')
  assert 'toy' in text and 'mAP' in text and 'Rank-3' in text


def test_evaluate_no_valid_query_raises():
  with pytest.raises(ValueError):
    R.market_metrics_from_distances(np.zeros((1, 2), np.float32), [1], [1, 2], [0], [0, 0])


# ------------------------------------------------------------------ k-reciprocal Jaccard


@pytest.mark.parametrize('tile', [2048, 176, 64])
def test_jaccard_distance_matches_dense_reference(tile):
  rng = np.random.default_rng(0)
  x, _ = clustered_features(rng, 300)
  ref, m = dense_train_jaccard(x)
  graph = R.jaccard_distance(x, tile_size=tile)
  mat = graph.matrix
  assert isinstance(mat, sp.csr_matrix) and mat.shape == (300, 300)
  # stored pattern == pairs whose V rows overlap (m > 0), including exact zeros on the diagonal
  pattern = np.zeros((300, 300), bool)
  coo = mat.tocoo()
  pattern[coo.row, coo.col] = True
  np.testing.assert_array_equal(pattern, m > 0)
  assert np.all(np.abs(mat.diagonal()) < 1e-6) and mat.nnz > 300
  assert (mat.data == 0).sum() >= 100  # explicit zeros are stored (diagonal, up to rounding)
  np.testing.assert_allclose(graph.to_dense(), ref, atol=2e-5)
  assert (mat != mat.T).nnz == 0


def test_jaccard_distance_non_unit_features_reference_formula():
  # The reference's 2|x_i|^2 - 2 x_i.x_j with column max + transpose (not symmetric here).
  rng = np.random.default_rng(1)
  x, _ = clustered_features(rng, 200, unit=False)
  x *= rng.uniform(0.5, 2.0, (200, 1)).astype(np.float32)
  ref, _ = dense_train_jaccard(x, k1=10, k2=4)
  graph = R.jaccard_distance(x, k1=10, k2=4, tile_size=64)
  np.testing.assert_allclose(graph.to_dense(), ref, atol=2e-5)


def test_jaccard_distance_source_mixing():
  rng = np.random.default_rng(2)
  x, _ = clustered_features(rng, 300)
  src, _ = clustered_features(rng, 150)
  ref, _ = dense_train_jaccard(x, source=src, lam=0.1)
  graph = R.jaccard_distance(x, source_features=src, lam=0.1, tile_size=128)
  assert graph.source_term is not None and graph.lam == 0.1
  np.testing.assert_allclose(graph.to_dense(), ref, atol=2e-5)
  lo, hi = graph.implicit_bounds()
  assert 0.9 <= lo <= hi <= 1.1


def test_rerank_matches_dense_reference():
  rng = np.random.default_rng(4)
  x, _ = clustered_features(rng, 300)
  q, g = x[:70], x[70:]
  for square in (True, False):
    ref = dense_rerank(q, g, square=square)
    got = R.rerank(q, g, square_distances=square, tile_size=176 if square else 64)
    assert got.shape == (70, 230) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_evaluate_with_rerank():
  rng = np.random.default_rng(5)
  x, labels = clustered_features(rng, 260, n_clusters=25, noise=0.5)
  cams = rng.integers(0, 4, 260)
  q, g = slice(0, 60), slice(60, 260)
  got = R.market_metrics(x[q], x[g], labels[q], labels[g], cams[q], cams[g], rerank=True)
  dist = dense_rerank(x[q], x[g])
  ref = slow_evaluate(dist, labels[q], labels[g], cams[q], cams[g])
  for key in ('mAP', 'top1', 'top5', 'top10'):
    assert got[key] == pytest.approx(ref[key], abs=1e-6)


def test_pair_raw_host_and_jax_paths_agree():
  import jax.numpy as jnp

  rng = np.random.default_rng(6)
  x = rng.standard_normal((50, 16)).astype(np.float32)
  rows, cols = rng.integers(0, 50, 30), rng.integers(0, 50, 30)
  x64 = x.astype(np.float64)
  sq = (x64**2).sum(1)
  dot = (x64[rows] * x64[cols]).sum(1)
  for mode, square, ref in [
      ('train', False, 2 * sq[cols] - 2 * dot),
      ('test', True, (sq[rows] + sq[cols] - 2 * dot) ** 2),
  ]:
    host = distances.raw_distance_pairs(x, rows, cols, mode, square)
    np.testing.assert_allclose(host, ref, rtol=1e-4, atol=1e-3)
    kernel = distances._get_pair_kernel(32, mode, square)
    xd = jnp.asarray(x)
    r32, c32 = np.pad(rows, (0, 2)).astype(np.int32), np.pad(cols, (0, 2)).astype(np.int32)
    dev = np.asarray(kernel(xd, jnp.sum(xd * xd, 1), r32, c32))[:30]
    np.testing.assert_allclose(dev, ref, rtol=1e-4, atol=1e-3)
