"""Pseudo-labels for the target domain: K-means, DBSCAN on the sparse Jaccard graph, statistics.

docs/reference.md section 3 (step 2 of each MMT / ABMT epoch): K-means with K = 500..2000, or DBSCAN
(min_samples 4, metric 'precomputed') on the k-reciprocal Jaccard distance of section 4 with eps
taken as the mean of the smallest rho-fraction of pairwise distances (rho = 1.6e-3 fixed at epoch 0
for MMT, 2e-3 re-estimated every epoch for ABMT). The reference works on a dense N x N matrix;
here the distance is a `jaxreid.retrieval.JaccardGraph` (stored pairs + an implicit value for the
rest) and eps / DBSCAN are computed exactly from it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from jaxreid.retrieval import JaccardGraph
from jaxreid.retrieval import jaccard_distance
from jaxreid.retrieval.distances import sqdist

__all__ = [
    'kmeans',
    'estimate_eps',
    'dbscan',
    'pseudo_labels',
    'centroids',
    'relabel_contiguous',
    'cluster_stats',
]

# Most implicit pairs (source mixing only) that estimate_eps / dbscan will enumerate explicitly.
MAX_IMPLICIT_PAIRS = 50_000_000


# --------------------------------------------------------------------------------------------
# K-means (JAX, with sklearn as the reference backend)
# --------------------------------------------------------------------------------------------

# Distances: `retrieval.distances.sqdist`, full float32 products (not TF32 on GPUs) as in the
# reference's float32 K-means.


@functools.partial(jax.jit, static_argnames=('k', 'n_trials'))
def _kmeans_plusplus(key, x, x_sq, w, *, k, n_trials):
  """Greedy k-means++ (as sklearn: 2 + log k candidates per step, keep the best potential)."""
  n = x.shape[0]
  key, sub = jax.random.split(key)
  first = jax.random.choice(sub, n, p=w / jnp.sum(w))
  c0 = x[first]
  closest = jnp.maximum(sqdist(x, c0[None], x_sq=x_sq)[:, 0], 0.0) * w
  centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(c0)

  def body(i, state):
    centers, closest, key = state
    key, sub = jax.random.split(key)
    cum = jnp.cumsum(closest)
    r = jax.random.uniform(sub, (n_trials,), dtype=cum.dtype) * cum[-1]
    cand = jnp.minimum(jnp.searchsorted(cum, r), n - 1)
    xc = x[cand]
    dc = jnp.maximum(sqdist(xc, x, x_sq=x_sq[cand]).astype(closest.dtype), 0.0)  # (trials, n)
    newc = jnp.minimum(closest[None, :], dc) * w[None, :]
    best = jnp.argmin(jnp.sum(newc, axis=1))
    return centers.at[i].set(xc[best]), newc[best], key

  centers, _, _ = jax.lax.fori_loop(1, k, body, (centers, closest, key))
  return centers


@functools.partial(jax.jit, static_argnames=('max_iter',))
def _lloyd(xb, sqb, wb, centers, tol, *, max_iter):
  """Lloyd iterations on row blocks xb (nb, B, d); stops like sklearn (labels unchanged, or
  centre shift^2 <= tol). Empty clusters keep their previous centre."""
  k, d = centers.shape
  x_flat = xb.reshape(-1, d)
  w_flat = wb.reshape(-1)

  def assign(c):
    def one(args):
      xx, ss = args
      dist = sqdist(xx, c, x_sq=ss)
      return jnp.argmin(dist, axis=1).astype(jnp.int32), jnp.min(dist, axis=1)

    lab, mind = jax.lax.map(one, (xb, sqb))
    return lab.reshape(-1), mind.reshape(-1)

  def update(lab, c):
    sums = jax.ops.segment_sum(x_flat * w_flat[:, None], lab, num_segments=k)
    cnt = jax.ops.segment_sum(w_flat, lab, num_segments=k)
    return jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1.0)[:, None], c)

  def cond(state):
    it, _, shift, changed, _ = state
    return (it < max_iter) & (shift > tol) & changed

  def body(state):
    it, c, _, _, prev = state
    lab, _ = assign(c)
    new = update(lab, c)
    changed = jnp.any((lab != prev) & (w_flat > 0))
    return it + 1, new, jnp.sum((new - c) ** 2), changed, lab

  init = (0, centers, jnp.inf, True, jnp.full(x_flat.shape[0], -1, jnp.int32))
  it, centers, _, _, _ = jax.lax.while_loop(cond, body, init)
  lab, mind = assign(centers)
  return lab, centers, jnp.sum(mind * w_flat), it


def kmeans(
    features,
    k: int,
    *,
    seed: int = 0,
    iters: int = 300,
    n_init: int = 1,
    tol: float = 1e-4,
    backend: str = 'jax',
    block_size: int = 4096,
):
  """K-means with k-means++ initialisation -> (labels (N,) int64, centroids (k, D) float32).

  backend 'jax': jitted greedy k-means++ and Lloyd iterations with fixed shapes, the distance
  computation blocked over rows (device memory ~ block_size x k), on the accelerator.
  backend 'sklearn': ``sklearn.cluster.KMeans`` (the reference's choice). ``tol`` is scaled by
  the mean feature variance as in sklearn. The MMT reference ran sklearn 0.2x with its default
  n_init=10; the default here is 1 (pass n_init=10 to reproduce; each run costs a full K-means).
  """
  x = np.ascontiguousarray(np.asarray(features, np.float32))
  n = x.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f'k must be in [1, {n}], got {k}')
  if backend == 'sklearn':
    from sklearn.cluster import KMeans

    km = KMeans(
        n_clusters=k, init='k-means++', n_init=n_init, max_iter=iters, tol=tol, random_state=seed
    ).fit(x)
    return km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)
  if backend != 'jax':
    raise ValueError(f"backend must be 'jax' or 'sklearn', got {backend!r}")
  tol_scaled = float(np.mean(np.var(x, axis=0, dtype=np.float64)) * tol)
  block = int(min(block_size, n))
  nb = -(-n // block)
  xp = np.zeros((nb * block, x.shape[1]), np.float32)
  xp[:n] = x
  w = (np.arange(nb * block) < n).astype(np.float32)
  x_dev = jnp.asarray(xp)
  sq = jnp.sum(x_dev * x_dev, axis=1)
  w_dev = jnp.asarray(w)
  xb = x_dev.reshape(nb, block, -1)
  sqb = sq.reshape(nb, block)
  wb = w_dev.reshape(nb, block)
  n_trials = 2 + int(math.log(k))
  best = None
  key = jax.random.key(seed)
  for _ in range(max(1, n_init)):
    key, sub = jax.random.split(key)
    c0 = _kmeans_plusplus(sub, x_dev, sq, w_dev, k=k, n_trials=n_trials)
    lab, cen, inertia, _ = _lloyd(xb, sqb, wb, c0, tol_scaled, max_iter=iters)
    inertia = float(inertia)
    if best is None or inertia < best[0]:
      best = (inertia, lab, cen)
  return np.asarray(best[1])[:n].astype(np.int64), np.asarray(best[2], np.float32)


# --------------------------------------------------------------------------------------------
# eps heuristic and DBSCAN on the sparse Jaccard graph
# --------------------------------------------------------------------------------------------


def _row_chunks(mat: sp.csr_matrix, max_nnz: int = 1 << 22):
  """Yield (rows int32, cols int32, values) of a CSR matrix, a few million entries at a time
  (so no int64 index array of the full, possibly 100M-entry, graph is ever built)."""
  indptr = mat.indptr
  n = mat.shape[0]
  r = 0
  while r < n:
    r1 = int(np.searchsorted(indptr, indptr[r] + max_nnz, side='right')) - 1
    r1 = min(max(r1, r + 1), n)
    a, b = indptr[r], indptr[r1]
    rows = np.repeat(np.arange(r, r1, dtype=np.int32), np.diff(indptr[r : r1 + 1]))
    yield rows, mat.indices[a:b], mat.data[a:b]
    r = r1


def _stored_upper_keys(mat: sp.csr_matrix) -> np.ndarray:
  """Sorted int64 keys i * N + j of the stored strictly-upper pairs."""
  n = mat.shape[0]
  out = [r[c > r].astype(np.int64) * n + c[c > r] for r, c, _ in _row_chunks(mat)]
  return np.concatenate(out) if out else np.zeros(0, np.int64)


def _pairs_sum_at_most(s: np.ndarray, y: float, limit: int):
  """All pairs i < j with s_i + s_j <= y (vectorised over the sorted s), or None if > limit."""
  order = np.argsort(s, kind='stable')
  ss = s[order].astype(np.float64)
  n = ss.size
  ends = np.searchsorted(ss, y - ss, side='right')
  cnt = np.maximum(ends - np.arange(n) - 1, 0)
  total = int(cnt.sum())
  if total > limit:
    return None
  a = np.repeat(np.arange(n, dtype=np.int64), cnt)
  start = np.cumsum(cnt) - cnt
  b = np.arange(total, dtype=np.int64) - np.repeat(start, cnt) + a + 1
  i, j = order[a], order[b]
  return np.minimum(i, j), np.maximum(i, j)


def _count_pairs_sum_at_most(ss_sorted: np.ndarray, y: float) -> int:
  n = ss_sorted.size
  ends = np.searchsorted(ss_sorted, y - ss_sorted, side='right')
  return int(np.maximum(ends - np.arange(n) - 1, 0).sum())


def _missing_implicit(graph: JaccardGraph, i, j, stored_keys):
  """Keep the candidate pairs (i < j) that are not stored; return them with implicit values."""
  n = graph.num_samples
  keys = i * n + j
  pos = np.searchsorted(stored_keys, keys)
  pos = np.minimum(pos, max(stored_keys.size - 1, 0))
  is_stored = stored_keys.size > 0
  if is_stored:
    missing = stored_keys[pos] != keys
  else:
    missing = np.ones(keys.size, bool)
  i, j = i[missing], j[missing]
  return i, j, graph.implicit_value(i, j)


def estimate_eps(graph: JaccardGraph, rho: float) -> float:
  """MMT's eps heuristic, exactly, from the sparse graph (docs/reference.md section 3).

  Dense reference: take the strict upper triangle of the distance matrix, drop entries equal to
  0, sort, eps = mean of the smallest round(rho * count). Here count = (stored non-zero upper
  values) + (missing upper pairs, whose implicit value is > 0). Without source mixing the
  implicit value is 1 (never smaller than a stored value); with it, the implicit values
  (1 - lam) + lam (s_i + s_j) may interleave with stored values, and the needed ones are
  enumerated in increasing s_i + s_j (exact; raises MemoryError in the pathological case where
  more than ``MAX_IMPLICIT_PAIRS`` would be needed).
  """
  n = graph.num_samples
  if n < 2:
    raise ValueError('need at least two samples')
  if not 0.0 < rho <= 1.0:
    raise ValueError(f'rho must be in (0, 1], got {rho}')
  upper = [v[c > r] for r, c, v in _row_chunks(graph.matrix)]
  upper = np.concatenate(upper) if upper else np.zeros(0, np.float32)
  n_stored = upper.size
  nonzero = upper[upper != 0]
  del upper
  n_missing = n * (n - 1) // 2 - n_stored
  count = nonzero.size + n_missing
  top_num = int(np.round(rho * count))
  if top_num <= 0:
    raise ValueError(f'rho={rho} selects no pair out of {count}')
  lo, _ = graph.implicit_bounds()
  if top_num <= nonzero.size:
    part = np.partition(nonzero, top_num - 1)[:top_num]
    if n_missing == 0 or part.max() <= lo:
      return float(part.astype(np.float64).mean())
  if graph.source_term is None:  # every implicit value is exactly 1.0
    vals = np.concatenate([nonzero.astype(np.float64), np.ones(min(n_missing, top_num))])
    return float(np.partition(vals, top_num - 1)[:top_num].mean())
  # Source mixing: the top_num smallest implicit values suffice. Find the smallest s-sum bound y
  # such that at least top_num + (#stored upper pairs) pairs have s_i + s_j <= y: at least
  # top_num of those are missing, and every other missing pair has a larger implicit value.
  s = graph.source_term.astype(np.float64)
  ss = np.sort(s)
  need = min(top_num + n_stored, n * (n - 1) // 2)
  y_lo, y_hi = 2 * ss[0] - 1e-12, 2 * ss[-1] + 1e-12
  for _ in range(100):
    mid = 0.5 * (y_lo + y_hi)
    if _count_pairs_sum_at_most(ss, mid) >= need:
      y_hi = mid
    else:
      y_lo = mid
    if y_hi - y_lo < 1e-13:
      break
  pairs = _pairs_sum_at_most(graph.source_term, y_hi, MAX_IMPLICIT_PAIRS)
  if pairs is None:
    raise MemoryError(
        f'estimate_eps: rho={rho} reaches beyond the stored pairs into more than '
        f'{MAX_IMPLICIT_PAIRS} implicit (source-mixed) pairs; use a smaller rho'
    )
  _, _, imp = _missing_implicit(graph, pairs[0], pairs[1], _stored_upper_keys(graph.matrix))
  vals = np.concatenate([nonzero.astype(np.float64), imp.astype(np.float64)])
  return float(np.partition(vals, top_num - 1)[:top_num].mean())


def _stored_diagonal_mask(mat: sp.csr_matrix) -> np.ndarray:
  """(N,) bool: whether (i, i) is a stored entry (scipy's diagonal() cannot tell a stored 0)."""
  out = np.zeros(mat.shape[0], bool)
  for r, c, _ in _row_chunks(mat):
    out[r[r == c]] = True
  return out


def _labels_all_connected(n, min_samples):
  return np.zeros(n, np.int64) if n >= min_samples else np.full(n, -1, np.int64)


def dbscan(graph: JaccardGraph, eps: float, min_samples: int = 4) -> np.ndarray:
  """sklearn DBSCAN (metric='precomputed') on the sparse graph: the labels of the dense matrix.

  Only stored entries <= eps are passed (sklearn treats every stored entry, explicit zeros
  included, as a neighbour, and keeps entries <= eps). The diagonal is always passed with its
  true value, because sklearn makes the diagonal explicit for sparse input: with source mixing
  d(i,i) = 2 lam s_i may exceed eps, and then, as on the dense matrix, i is not its own
  neighbour. Missing pairs have the implicit value (1 without source mixing, else
  (1 - lam) + lam (s_i + s_j) >= 1 - lam): if eps reaches the largest implicit value every pair
  is a neighbour (one cluster); if it reaches only some, those pairs are added explicitly
  (raises MemoryError beyond ``MAX_IMPLICIT_PAIRS``). Noise is labelled -1.
  """
  from sklearn.cluster import DBSCAN
  from sklearn.neighbors import sort_graph_by_row_values

  n = graph.num_samples
  mat = graph.matrix.tocsr()
  lo, hi = graph.implicit_bounds()
  diag_stored = _stored_diagonal_mask(mat)
  has_missing = mat.nnz - int(diag_stored.sum()) < n * (n - 1)
  # A diagonal entry that is not stored (a point with an empty V row) has the implicit value
  # in the dense matrix; sklearn would add it as an explicit 0, so pass it explicitly.
  miss_diag = np.nonzero(~diag_stored)[0]
  miss_diag_val = graph.implicit_value(miss_diag, miss_diag)
  if has_missing and eps >= hi and (miss_diag.size == 0 or eps >= miss_diag_val.max()):
    return _labels_all_connected(n, min_samples)
  parts = [(miss_diag.astype(np.int32), miss_diag.astype(np.int32), miss_diag_val)]
  for r, c, v in _row_chunks(mat):
    keep = (r == c) | (v <= eps)  # the diagonal always, with its true value
    parts.append((r[keep], c[keep], v[keep]))
  rows = np.concatenate([p[0] for p in parts])
  cols = np.concatenate([p[1] for p in parts])
  data = np.concatenate([p[2] for p in parts])
  del parts
  if has_missing and graph.source_term is not None and eps >= lo:
    y = (eps - graph.base) / graph.lam + 1e-9
    pairs = _pairs_sum_at_most(graph.source_term, y, MAX_IMPLICIT_PAIRS)
    if pairs is None:
      raise MemoryError(
          f'dbscan: eps={eps} makes more than {MAX_IMPLICIT_PAIRS} implicit (source-mixed) '
          'pairs neighbours; lower eps'
      )
    i, j, v = _missing_implicit(graph, pairs[0], pairs[1], _stored_upper_keys(mat))
    ok = v <= eps
    i, j, v = i[ok], j[ok], v[ok]
    rows = np.concatenate([rows, i, j])
    cols = np.concatenate([cols, j, i])
    data = np.concatenate([data, v, v])
  g = sp.csr_matrix((data.astype(np.float64), (rows, cols)), shape=(n, n))
  g = sort_graph_by_row_values(g, copy=False, warn_when_not_sorted=False)
  labels = DBSCAN(eps=eps, min_samples=min_samples, metric='precomputed').fit(g).labels_
  return labels.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Convenience and statistics
# --------------------------------------------------------------------------------------------


def relabel_contiguous(labels) -> np.ndarray:
  """Map the non-negative labels to 0..K-1 (in increasing order of the old label); -1 stays."""
  labels = np.asarray(labels).astype(np.int64)
  out = np.full(labels.shape, -1, np.int64)
  m = labels >= 0
  _, inv = np.unique(labels[m], return_inverse=True)
  out[m] = inv
  return out


def centroids(features, labels, num_clusters: int | None = None) -> np.ndarray:
  """(num_clusters, D) float32 mean feature of each cluster; noise (-1) ignored, empty -> 0.

  These become the classifier rows after L2 normalisation (docs/reference.md section 3, step 3).
  """
  x = np.asarray(features, np.float32)
  labels = np.asarray(labels).astype(np.int64)
  if num_clusters is None:
    num_clusters = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
  m = labels >= 0
  if np.any(labels[m] >= num_clusters):
    raise ValueError(f'labels reach {labels.max()} but num_clusters={num_clusters}')
  idx = np.nonzero(m)[0]
  onehot = sp.csr_matrix(
      (np.ones(idx.size, np.float64), (labels[idx], idx)), shape=(num_clusters, x.shape[0])
  )
  sums = onehot @ x.astype(np.float64)
  cnt = np.bincount(labels[idx], minlength=num_clusters)
  out = np.zeros((num_clusters, x.shape[1]), np.float32)
  nz = cnt > 0
  out[nz] = sums[nz] / cnt[nz, None]
  return out


def cluster_stats(labels, true_labels=None) -> dict:
  """Statistics of pseudo-labels: number of clusters, noise fraction, cluster sizes; with ground
  truth also purity, NMI, ARI and pairwise precision / recall / F-score.

  Everything against ground truth is computed on the non-noise samples only (noise has no
  pseudo-label); pairs are counted from the contingency table (sum of C(n_ij, 2)), never O(N^2).
  purity = sum over clusters of its largest true-class count / #clustered samples; pairwise
  precision = same-cluster pairs that share the true label / same-cluster pairs; recall = those
  pairs / same-true-label pairs (among clustered samples).
  """
  labels = np.asarray(labels).astype(np.int64)
  n = labels.size
  m = labels >= 0
  sizes = np.bincount(relabel_contiguous(labels[m])) if m.any() else np.zeros(0, np.int64)
  out = {
      'num_samples': int(n),
      'num_clusters': int(sizes.size),
      'noise_fraction': float(1.0 - m.mean()) if n else 0.0,
      'largest_cluster': int(sizes.max()) if sizes.size else 0,
      'median_cluster': float(np.median(sizes)) if sizes.size else 0.0,
      'singletons': int(np.sum(sizes == 1)),
  }
  if true_labels is None:
    return out
  from sklearn.metrics import adjusted_rand_score
  from sklearn.metrics import normalized_mutual_info_score

  t = np.asarray(true_labels).astype(np.int64)
  if t.shape != labels.shape:
    raise ValueError(f'true_labels shape {t.shape} != labels shape {labels.shape}')
  a, t = labels[m], t[m]
  if a.size == 0:
    out.update(
        purity=0.0,
        nmi=0.0,
        ari=0.0,
        pairwise_precision=0.0,
        pairwise_recall=0.0,
        pairwise_fscore=0.0,
    )
    return out
  _, ai = np.unique(a, return_inverse=True)
  _, ti = np.unique(t, return_inverse=True)
  nt = int(ti.max()) + 1
  keys, cell = np.unique(ai * nt + ti, return_counts=True)  # contingency table cells
  cell_cluster = keys // nt

  def pairs(c):
    c = c.astype(np.float64)
    return float(np.sum(c * (c - 1) / 2))

  best = np.zeros(int(ai.max()) + 1, np.int64)
  np.maximum.at(best, cell_cluster, cell)
  tp = pairs(cell)
  pred = pairs(np.bincount(ai))
  true = pairs(np.bincount(ti))
  prec = tp / pred if pred > 0 else 0.0
  rec = tp / true if true > 0 else 0.0
  out.update(
      purity=float(best.sum() / a.size),
      nmi=float(normalized_mutual_info_score(t, a)),
      ari=float(adjusted_rand_score(t, a)),
      pairwise_precision=prec,
      pairwise_recall=rec,
      pairwise_fscore=(2 * prec * rec / (prec + rec)) if prec + rec > 0 else 0.0,
  )
  return out


def pseudo_labels(
    features,
    method: str = 'kmeans',
    *,
    num_clusters: int | None = None,
    eps: float | None = None,
    rho: float = 1.6e-3,
    min_samples: int = 4,
    k1: int = 20,
    k2: int = 6,
    source_features=None,
    lam: float = 0.0,
    seed: int = 0,
    backend: str = 'jax',
    n_init: int = 1,
):
  """Cluster target features into pseudo-labels -> (labels (N,) int64, info dict).

  method 'kmeans' (MMT's main version): needs ``num_clusters``; info has 'centroids'.
  method 'dbscan': Jaccard graph (k1, k2, optional ABMT source mixing with ``lam``), eps given
  (MMT fixes it at epoch 0: pass info['eps'] back) or estimated from ``rho``; labels are
  contiguous with -1 for noise. info always has 'num_clusters' and 'noise_fraction'.
  """
  x = np.asarray(features, np.float32)
  if method == 'kmeans':
    if num_clusters is None:
      raise ValueError("method='kmeans' needs num_clusters")
    labels, cen = kmeans(x, num_clusters, seed=seed, backend=backend, n_init=n_init)
    info = {'centroids': cen}
  elif method == 'dbscan':
    graph = jaccard_distance(x, k1=k1, k2=k2, source_features=source_features, lam=lam)
    if eps is None:
      eps = estimate_eps(graph, rho)
    labels = relabel_contiguous(dbscan(graph, eps, min_samples=min_samples))
    info = {'eps': float(eps)}
  else:
    raise ValueError(f"method must be 'kmeans' or 'dbscan', got {method!r}")
  info['num_clusters'] = int(labels.max()) + 1 if (labels >= 0).any() else 0
  info['noise_fraction'] = float(np.mean(labels < 0))
  return labels, info
