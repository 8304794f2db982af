"""DBSCAN on the sparse k-reciprocal Jaccard graph, and MMT's eps heuristic, both exact.

docs/reference.md sections 3 and 4: DBSCAN (min_samples 4, metric 'precomputed') on the Jaccard
distance with eps taken as the mean of the smallest rho-fraction of pairwise distances (rho =
1.6e-3 fixed at epoch 0 for MMT, 2e-3 re-estimated every epoch for ABMT). The reference works on a
dense N x N matrix; here the distance is a `jaxreid.retrieval.JaccardGraph` (stored pairs + an
implicit value for the rest) and eps / DBSCAN give the dense matrix's results from it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import DBSCAN
from sklearn.neighbors import sort_graph_by_row_values

from jaxreid.retrieval import JaccardGraph

# Most implicit pairs (source mixing only) that estimate_eps / dbscan will enumerate explicitly.
MAX_IMPLICIT_PAIRS = 50_000_000


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
