"""Retrieval: distances, the Market evaluation protocol, k-reciprocal Jaccard distance, re-ranking.

Two parts (docs/reference.md sections 4 and 5):

* Evaluation (section 5): squared-Euclidean distances computed blockwise with JAX, then mAP and
  CMC (first match break) under the Market protocol, fully vectorised: instead of arg-sorting every
  query row we sort only the *negatives* of each row (as monotone int32 keys, the fastest sort
  numpy has) and place each true match with a vectorised binary search. That gives the exact rank of
  every true match, hence exact AP and CMC, at a fraction of the cost of an arg-sort.

* k-reciprocal encoding (section 4), one implementation for both uses, the training-time Jaccard
  distance of MMT/ABMT (`jaccard_distance`) and test-time re-ranking (`rerank`). The reference
  (`mmt/utils/rerank.py`) builds dense N x N matrices (25 GB at N = 32,621; impossible at the
  93,820 images of MSMT17's test set). Here everything is N x k-ish:

  1. one blocked pass over the symmetric similarity matrix (each tile X_I X_J^T computed once and
     used for the rows of I and of J) keeps, per row, the K = max(k1+1, k2) nearest neighbours and
     the row maximum (the farthest point, needed for the reference's row normalisation);
  2. k-reciprocal sets, the expansion rule and the V weights are computed from that neighbour table
     (vectorised numpy; the few expansion members outside the table get their distances from
     gathered dot products);
  3. V and its query expansion are sparse CSR rows (a few hundred non-zeros);
  4. the Jaccard numerator m(i,j) = sum_k min(V_ik, V_jk) is accumulated only for pairs sharing a
     non-zero column, by enumerating, column by column, the pairs of rows that have it (a
     column-sorted join, done in bulk with repeat/cumsum index arithmetic and ``np.bincount``).

  The result equals the dense algorithm (up to float rounding) whenever there are no exact ties in
  the distances (ties may be ordered differently from the reference's unstable arg-sort).

Reference quirks reproduced on purpose (and documented where they live): the training distance is
``2|x_j|^2 - 2 x_i.x_j`` divided by its row maximum (the reference's column-max-then-transpose), and
test-time re-ranking squares the squared-Euclidean distances a second time
(`square_distances=True`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from jaxreid.metrics_writer import format_duration
from jaxreid.metrics_writer import log

__all__ = [
    'squared_distance',
    'evaluate',
    'evaluate_distances',
    'format_results',
    'JaccardGraph',
    'NeighbourTable',
    'nearest_neighbours',
    'source_term',
    'jaccard_distance',
    'rerank',
]

_INT32_MAX = np.iinfo(np.int32).max
_log = logging.getLogger(__name__)
_NUM_THREADS = max(1, min(4, os.cpu_count() or 1))


def _f32(a) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _pad_rows(a: np.ndarray, multiple: int) -> np.ndarray:
  n = a.shape[0]
  n_pad = -(-n // multiple) * multiple
  if n_pad == n:
    return a
  out = np.zeros((n_pad,) + a.shape[1:], a.dtype)
  out[:n] = a
  return out


# --------------------------------------------------------------------------------------------
# Distances (docs/reference.md section 5: squared Euclidean, 2 - 2cos on unit vectors)
# --------------------------------------------------------------------------------------------


def full_dot_t(a, b):
  """a @ b.T in full float32, for every distance here and in clustering. On NVIDIA GPUs JAX's
  default precision runs float32 products on TF32 tensor cores (10-bit mantissa; measured on
  the H100, experiments/gpu_h100/ceilings.log), which perturbs distances by ~1e-3 and can
  reorder near-ties; the reference evaluates in float32 (no effect on CPU)."""
  return jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _sqdist_tile(q, g, g_sq):
  # Same formula and order as the reference evaluator: |q|^2 + |g|^2 - 2 q.g (float32).
  q_sq = jnp.sum(q * q, axis=1, keepdims=True)
  return q_sq + g_sq[None, :] - 2.0 * full_dot_t(q, g)


def _iter_sqdist_blocks(query_features, gallery_features, block_size):
  """Yield (start, stop, host (rows, G) float32 block) of squared distances, computed with JAX."""
  q = _f32(query_features)
  g = _f32(gallery_features)
  if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
    raise ValueError(f'features must be (Q, D) and (G, D), got {q.shape} and {g.shape}')
  g_dev = jnp.asarray(g)
  g_sq = jnp.sum(g_dev * g_dev, axis=1)
  nq = q.shape[0]
  block_size = max(1, min(block_size, nq))
  q_pad = _pad_rows(q, block_size)
  # Dispatch one block ahead so the host work on block b overlaps the device work on b + 1.
  pending = None
  for start in range(0, nq, block_size):
    res = _sqdist_tile(jnp.asarray(q_pad[start : start + block_size]), g_dev, g_sq)
    if pending is not None:
      yield pending[0], pending[1], np.asarray(pending[2])[: pending[1] - pending[0]]
    pending = (start, min(start + block_size, nq), res)
  if pending is not None:
    yield pending[0], pending[1], np.asarray(pending[2])[: pending[1] - pending[0]]


def squared_distance(q, g, *, block_size: int = 2048) -> np.ndarray:
  """Squared Euclidean distances (Q, G) as a host float32 array.

  |q|^2 + |g|^2 - 2 q.g, which is 2 - 2cos for unit vectors (docs/reference.md section 5). Computed with
  JAX (the accelerator when there is one) in blocks of query rows so the device only ever holds
  one (block_size, G) tile besides the gallery.
  """
  q = _f32(q)
  g = _f32(g)
  out = np.empty((q.shape[0], g.shape[0]), np.float32)
  for start, stop, block in _iter_sqdist_blocks(q, g, block_size):
    out[start:stop] = block
  return out


# --------------------------------------------------------------------------------------------
# Evaluation (docs/reference.md section 5)
# --------------------------------------------------------------------------------------------


def _monotone_keys(d: np.ndarray) -> np.ndarray:
  """int32 keys (a new array) with the same order as the float32 values, exactly.

  Non-negative floats already order like their bit patterns; the (rare) negative values get
  their magnitude bits flipped, and -0.0 is mapped to +0.0's key.
  """
  keys = np.array(d, dtype=np.float32, order='C', copy=True).view(np.int32)
  neg = keys < 0  # sign bit set
  if neg.any():
    r, c = np.nonzero(neg)
    bits = (d[r, c].astype(np.float32) + np.float32(0.0)).view(np.int32)
    keys[r, c] = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
  return keys


def _sort_rows_threaded(a: np.ndarray) -> None:
  """In-place row sort, split over a few threads (numpy releases the GIL while sorting)."""
  n = a.shape[0]
  if n < 2 * 64 or _NUM_THREADS == 1:
    a.sort(axis=1)
    return
  bounds = np.linspace(0, n, _NUM_THREADS + 1).astype(int)
  with concurrent.futures.ThreadPoolExecutor(_NUM_THREADS) as ex:
    list(ex.map(lambda s: a[bounds[s] : bounds[s + 1]].sort(axis=1), range(_NUM_THREADS)))


class _Gallery:
  """Gallery ids grouped by identity, so a query's same-identity items are found without
  scanning the gallery (searchsorted in the sorted pids)."""

  def __init__(self, g_pids, g_camids):
    self.pids = g_pids
    self.camids = g_camids
    self.order = np.argsort(g_pids, kind='stable')
    self.sorted_pids = g_pids[self.order]

  def same_pid_pairs(self, q_pids):
    lo = np.searchsorted(self.sorted_pids, q_pids, side='left')
    cnt = np.searchsorted(self.sorted_pids, q_pids, side='right') - lo
    rows = np.repeat(np.arange(q_pids.size), cnt)
    start = np.cumsum(cnt) - cnt
    pos = np.repeat(lo - start, cnt) + np.arange(int(cnt.sum()))
    return rows, self.order[pos]


def _block_metrics(dist, q_pids, q_camids, gallery: _Gallery):
  """AP and first-match position (among valid gallery items) for a block of queries.

  Valid gallery items for a query: everything except same identity *and* same camera.
  Negatives are the different-identity items; each true match's 0-based rank among the valid
  items is (#negatives ranked before it) + (#true matches ranked before it): only the negatives
  of each row are sorted (int32 keys), and true matches are placed by a vectorised binary
  search. Ties between a true match and a negative are resolved against the match
  (conservative); the reference arg-sort leaves them in arbitrary order. Returns
  (ap, first, has_match); ap/first are NaN/-1 where the query has no valid true match.
  """
  b, g = dist.shape
  srows, scols = gallery.same_pid_pairs(q_pids)
  keys = _monotone_keys(dist)
  true = q_camids[srows] != gallery.camids[scols]
  rows, tkeys = srows[true], keys[srows[true], scols[true]]
  keys[srows, scols] = _INT32_MAX  # same identity: not a negative (true match or junk)
  _sort_rows_threaded(keys)
  neg_keys = keys
  n_true = np.bincount(rows, minlength=b)
  has = n_true > 0
  ap = np.full(b, np.nan)
  first = np.full(b, -1, np.int64)
  if rows.size == 0:
    return ap, first, has
  order = np.lexsort((tkeys, rows))  # by row, then by distance
  rows, tkeys = rows[order], tkeys[order]
  # vectorised per-row binary search: number of negatives with key <= true key (side='right')
  lo = np.zeros(rows.size, np.int64)
  hi = np.full(rows.size, g, np.int64)
  for _ in range(int(math.ceil(math.log2(g + 1))) + 1):
    active = lo < hi
    if not active.any():
      break
    mid = (lo + hi) // 2
    midc = np.minimum(mid, g - 1)
    go_right = active & (neg_keys[rows, midc] <= tkeys)
    lo = np.where(go_right, mid + 1, lo)
    hi = np.where(active & ~go_right, mid, hi)
  n_before = lo
  starts = np.concatenate([[0], np.cumsum(n_true)])[:-1]
  r_in_row = np.arange(rows.size) - starts[rows]  # 0-based index of the match within its row
  position = n_before + r_in_row  # 0-based rank among valid items
  prec = (r_in_row + 1) / (position + 1.0)
  ap_sum = np.bincount(rows, weights=prec, minlength=b)
  ap[has] = ap_sum[has] / n_true[has]
  first[has] = n_before[starts[has]]
  return ap, first, has


def _check_ids(name, a, n):
  a = np.asarray(a)
  if a.shape != (n,):
    raise ValueError(f'{name} must have shape ({n},), got {a.shape}')
  return a.astype(np.int64)


class _MetricAccumulator:

  def __init__(self, topk):
    self.topk = tuple(int(k) for k in topk)
    self.aps = []
    self.firsts = []

  def add(self, ap, first, has):
    self.aps.append(ap[has])
    self.firsts.append(first[has])

  def result(self, num_queries):
    aps = np.concatenate(self.aps) if self.aps else np.zeros(0)
    firsts = np.concatenate(self.firsts) if self.firsts else np.zeros(0, np.int64)
    n_valid = aps.size
    if n_valid == 0:
      raise ValueError('no query has a valid true match in the gallery (different camera)')
    res = {'mAP': float(100.0 * aps.mean())}
    for k in self.topk:
      res[f'top{k}'] = float(100.0 * np.mean(firsts < k))
    res['num_valid_queries'] = int(n_valid)
    res['num_queries'] = int(num_queries)
    return res


def evaluate_distances(
    dist,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    topk: Sequence[int] = (1, 5, 10),
    block_size: int = 1024,
) -> dict:
  """mAP and CMC (Market protocol, first match break) from a (Q, G) distance matrix.

  Returns percentages: ``{'mAP', 'top1', 'top5', 'top10', 'num_valid_queries', 'num_queries'}``
  (one ``top{k}`` per entry of ``topk``). Gallery items with the query's identity *and* camera
  are removed, queries without a remaining true match are skipped (docs/reference.md section 5); AP is
  the cumulative-sum average precision over the ranked valid gallery (equal to sklearn's
  ``average_precision_score`` when there are no ties). Vectorised, blocked over queries.
  """
  dist = np.asarray(dist)
  if dist.ndim != 2:
    raise ValueError(f'dist must be (Q, G), got {dist.shape}')
  nq, ng = dist.shape
  blocks = (
      (s, min(s + block_size, nq), dist[s : s + block_size]) for s in range(0, nq, block_size)
  )
  return _protocol_metrics(blocks, nq, ng, q_pids, g_pids, q_camids, g_camids, topk)


def _protocol_metrics(blocks, nq, ng, q_pids, g_pids, q_camids, g_camids, topk) -> dict:
  """Market-protocol metrics accumulated over `(start, end, distance block)` query blocks."""
  q_pids = _check_ids('q_pids', q_pids, nq)
  g_pids = _check_ids('g_pids', g_pids, ng)
  q_camids = _check_ids('q_camids', q_camids, nq)
  g_camids = _check_ids('g_camids', g_camids, ng)
  acc = _MetricAccumulator(topk)
  gallery = _Gallery(g_pids, g_camids)
  for s, e, block in blocks:
    acc.add(*_block_metrics(block, q_pids[s:e], q_camids[s:e], gallery))
  return acc.result(nq)


def evaluate(
    query_features,
    gallery_features,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    topk: Sequence[int] = (1, 5, 10),
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lam: float = 0.3,
    square_distances: bool = True,
    block_size: int = 1024,
) -> dict:
  """Evaluate features under the Market protocol (docs/reference.md section 5); values in percent.

  Squared-Euclidean distances are computed blockwise with JAX and consumed block by block, so the
  full (Q, G) matrix is never held. ``rerank=True`` applies k-reciprocal re-ranking first
  (`rerank`, docs/reference.md section 4; off for all published numbers), which does materialise (Q, G).
  """
  qf = _f32(query_features)
  gf = _f32(gallery_features)
  nq, ng = qf.shape[0], gf.shape[0]
  if rerank:
    dist = _rerank_fn(qf, gf, k1=k1, k2=k2, lam=lam, square_distances=square_distances)
    return evaluate_distances(
        dist, q_pids, g_pids, q_camids, g_camids, topk=topk, block_size=block_size
    )
  return _protocol_metrics(
      _iter_sqdist_blocks(qf, gf, block_size), nq, ng, q_pids, g_pids, q_camids, g_camids, topk
  )


def format_results(results: dict, title: str | None = None) -> str:
  """A small aligned text table of an `evaluate` result (percent values)."""
  metric_keys = ['mAP'] + sorted(
      (k for k in results if k.startswith('top') and k[3:].isdigit()), key=lambda k: int(k[3:])
  )
  names = [('mAP' if k == 'mAP' else f'Rank-{k[3:]}') for k in metric_keys]
  vals = [f'{results[k]:.1f}%' for k in metric_keys]
  widths = [max(len(n), len(v)) for n, v in zip(names, vals)]
  head = ' | '.join(n.rjust(w) for n, w in zip(names, widths))
  line = '-+-'.join('-' * w for w in widths)
  row = ' | '.join(v.rjust(w) for v, w in zip(vals, widths))
  lines = []
  if title:
    lines.append(title)
  lines += [head, line, row]
  if 'num_valid_queries' in results:
    nq = results.get('num_queries')
    extra = f' of {nq}' if nq is not None else ''
    lines.append(f"({results['num_valid_queries']}{extra} queries with a valid true match)")
  return '\n'.join(lines)


# --------------------------------------------------------------------------------------------
# Blocked nearest-neighbour pass (docs/reference.md section 4, step 1)
# --------------------------------------------------------------------------------------------


def _raw_from_dot(s, n_row, n_col, mode: str, square: bool):
  """The un-normalised 'original distance' of the reference for a tile of dot products.

  mode 'train' (compute_jaccard_dist): o(i,j) = 2|x_j|^2 - 2 x_i.x_j. The reference computes
  2|x_i|^2 - 2 x_i.x_j, divides by the column max and transposes, which is this expression
  divided by its row max (identical to the symmetric form for unit features).
  mode 'test' (re_ranking): d = |x_i|^2 + |x_j|^2 - 2 x_i.x_j, squared again when ``square``
  (the reference's np.power(d, 2) applied to already squared distances).
  """
  if mode == 'train':
    return 2.0 * n_col - 2.0 * s
  d = n_row + n_col - 2.0 * s
  return d * d if square else d


@dataclasses.dataclass(frozen=True)
class NeighbourTable:
  """The K nearest neighbours of every point by the reference's 'original distance'.

  indices: (N, K) int32, ascending distance (self first when there are no duplicates).
  raw: (N, K) float32 un-normalised distances o(i, indices[i]).
  row_max: (N,) float32 maximum of o(i, :) over all points (the reference normalises each row
  by it, docs/reference.md section 4 step 1).
  """

  indices: np.ndarray
  raw: np.ndarray
  row_max: np.ndarray


def nearest_neighbours(
    features, k: int, *, mode: str = 'train', square: bool = False, tile_size: int = 2048, emit=None
) -> NeighbourTable:
  """Blocked exact k-NN table + row maxima with one pass over the symmetric similarity matrix.

  Each tile X_I X_J^T (J >= I) is computed once on the accelerator and used for the rows of I and
  (transposed) of J, halving the dominant matmul. Device memory is N x k plus two tiles.
  ``emit(i0, j0, raw_tile)`` (optional) receives every tile's raw distances on the host (rows
  I = [i0, i0+T), columns J = [j0, j0+T), padded); used by `rerank` to fill its output.
  """
  x = _f32(features)
  n = x.shape[0]
  if mode not in ('train', 'test'):
    raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
  k = int(min(k, n))
  n_blocks = max(1, -(-n // max(8, tile_size)))
  tile = int(-(-n // (8 * n_blocks)) * 8)  # even split, multiple of 8: little padding
  xp = _pad_rows(x, tile)
  npad = xp.shape[0]
  x_dev = jnp.asarray(xp)
  del xp
  sq = jnp.sum(x_dev * x_dev, axis=1)
  valid = jnp.asarray(np.arange(npad) < n)
  vals = jnp.full((npad, k), jnp.inf, jnp.float32)
  idx = jnp.zeros((npad, k), jnp.int32)
  rmax = jnp.full((npad,), -jnp.inf, jnp.float32)
  kernel = _get_knn_tile(tile)
  nb = npad // tile
  n_tiles = nb * (nb + 1) // 2
  done, next_report = 0, 0.1
  t0 = time.perf_counter()
  for bi in range(nb):
    if done >= next_report * n_tiles and nb > 4:  # progress, for long runs
      vals.block_until_ready()
      elapsed = time.perf_counter() - t0
      if elapsed > 5.0 and done:
        log(
            f'[neighbours] {done}/{n_tiles} tiles ({100.0 * done / n_tiles:.0f}%) '
            f'{format_duration(elapsed)} elapsed, eta '
            f'{format_duration(elapsed * (n_tiles - done) / done)}'
        )
      next_report = math.floor(10.0 * done / n_tiles) / 10.0 + 0.1
    done += nb - bi
    for bj in range(bi, nb):
      out = kernel(
          vals,
          idx,
          rmax,
          x_dev,
          sq,
          valid,
          np.int32(bi * tile),
          np.int32(bj * tile),
          k=k,
          mode=mode,
          square=square,
          emit=emit is not None,
      )
      if emit is not None:
        vals, idx, rmax, raw_i = out
        if emit.wants(bi * tile, bj * tile, tile):
          emit(bi * tile, bj * tile, np.asarray(raw_i))
      else:
        vals, idx, rmax = out
  table = NeighbourTable(
      indices=np.asarray(idx)[:n].copy(),
      raw=np.asarray(vals)[:n].copy(),
      row_max=np.asarray(rmax)[:n].copy(),
  )
  _log.info(
      'neighbour pass: N=%d, %d tiles of %d, k=%d: %.2f s',
      n,
      n_tiles,
      tile,
      k,
      time.perf_counter() - t0,
  )
  return table


def _smallest_k(a, k: int, axis: int = 1, groups: int = 8):
  """(-values, positions) of the k smallest entries along ``axis`` of a 2-D tile, like
  ``lax.top_k(-a, k)`` on rows (axis=1) or on columns (axis=0, without transposing the tile).

  Exact two-stage selection, cheaper than a full-width top-k on CPU: split the reduced axis into
  ``groups`` interleaved slices (entry m*w + g belongs to group g, w = width / groups, so the
  group minimum is a contiguous, vectorised reduction); the k smallest entries lie in the k
  groups with the smallest minima (any group holding one of them has a minimum no larger), so a
  top-k over the w group minima followed by a top-k over those k groups' entries suffices.
  """
  if axis == 0:
    t, n = a.shape
    if t % groups or t // groups < k:
      return jax.lax.top_k(-a.T, k)
    w = t // groups
    gmin = jnp.min(a.reshape(groups, w, n), axis=0).T  # (n, w)
    _, gi = jax.lax.top_k(-gmin, k)
    rows = (gi[:, :, None] + w * jnp.arange(groups)[None, None, :]).reshape(n, k * groups)
    vals = a[rows, jnp.arange(n)[:, None]]
    neg, p = jax.lax.top_k(-vals, k)
    return neg, jnp.take_along_axis(rows, p, axis=1)
  b, n = a.shape
  if n % groups or n // groups < k:
    return jax.lax.top_k(-a, k)
  w = n // groups
  gmin = jnp.min(a.reshape(b, groups, w), axis=1)  # (b, w)
  _, gi = jax.lax.top_k(-gmin, k)
  cols = (gi[:, :, None] + w * jnp.arange(groups)[None, None, :]).reshape(b, k * groups)
  neg, p = jax.lax.top_k(-jnp.take_along_axis(a, cols, axis=1), k)
  return neg, jnp.take_along_axis(cols, p, axis=1)


@functools.lru_cache(maxsize=None)
def _get_knn_tile(tile: int):
  """A jitted tile kernel specialised to one tile size (static shapes for XLA)."""

  @functools.partial(
      jax.jit, static_argnames=('k', 'mode', 'square', 'emit'), donate_argnums=(0, 1, 2)
  )
  def kernel(vals, idx, rmax, x, sq, valid, i0, j0, *, k, mode, square, emit):
    xi = jax.lax.dynamic_slice_in_dim(x, i0, tile)
    xj = jax.lax.dynamic_slice_in_dim(x, j0, tile)
    ni = jax.lax.dynamic_slice_in_dim(sq, i0, tile)
    nj = jax.lax.dynamic_slice_in_dim(sq, j0, tile)
    vi = jax.lax.dynamic_slice_in_dim(valid, i0, tile)
    vj = jax.lax.dynamic_slice_in_dim(valid, j0, tile)
    s = full_dot_t(xi, xj)

    def update(vals, idx, rmax, neg, pos, mx, r0, c0):
      cur_v = jax.lax.dynamic_slice_in_dim(vals, r0, tile)
      cur_i = jax.lax.dynamic_slice_in_dim(idx, r0, tile)
      allv = jnp.concatenate([cur_v, -neg], axis=1)
      alli = jnp.concatenate([cur_i, pos.astype(jnp.int32) + c0], axis=1)
      neg2, p2 = jax.lax.top_k(-allv, k)
      new_i = jnp.take_along_axis(alli, p2, axis=1)
      cur_m = jax.lax.dynamic_slice_in_dim(rmax, r0, tile)
      vals = jax.lax.dynamic_update_slice_in_dim(vals, -neg2, r0, 0)
      idx = jax.lax.dynamic_update_slice_in_dim(idx, new_i, r0, 0)
      rmax = jax.lax.dynamic_update_slice_in_dim(rmax, jnp.maximum(cur_m, mx), r0, 0)
      return vals, idx, rmax

    # rows of I against columns J
    raw_i = _raw_from_dot(s, ni[:, None], nj[None, :], mode, square)
    neg, pos = _smallest_k(jnp.where(vj[None, :], raw_i, jnp.inf), k, axis=1)
    mx = jnp.max(jnp.where(vj[None, :], raw_i, -jnp.inf), axis=1)
    vals, idx, rmax = update(vals, idx, rmax, neg, pos, mx, i0, j0)
    # rows of J against columns I, read column-wise from the same tile; on a diagonal tile
    # (i0 == j0) this would repeat the row update, so it is masked out (no separate compile)
    use = vi & (i0 != j0)
    raw_c = _raw_from_dot(s, nj[None, :], ni[:, None], mode, square)  # [a, b] = o(j_b, i_a)
    neg, pos = _smallest_k(jnp.where(use[:, None], raw_c, jnp.inf), k, axis=0)
    mx = jnp.max(jnp.where(use[:, None], raw_c, -jnp.inf), axis=0)
    vals, idx, rmax = update(vals, idx, rmax, neg, pos, mx, j0, i0)
    if emit:
      return vals, idx, rmax, raw_i
    return vals, idx, rmax

  return kernel


@functools.lru_cache(maxsize=None)
def _get_pair_kernel(chunk: int, mode: str, square: bool):
  @jax.jit
  def kernel(x, sq, rows, cols):
    s = jnp.sum(x[rows] * x[cols], axis=1)
    return _raw_from_dot(s, sq[rows], sq[cols], mode, square)

  return kernel


def _pair_raw(x: np.ndarray, rows, cols, mode, square, chunk=4096) -> np.ndarray:
  """Raw 'original distance' for arbitrary pairs via gathered dot products (blocked).

  On an accelerator the gather runs in JAX; on the CPU backend numpy's row gathers + einsum are
  about 3x faster than XLA's gather, so the host does it (the features are on the host anyway).
  """
  out = np.empty(rows.size, np.float32)
  if rows.size == 0:
    return out
  if jax.default_backend() == 'cpu':
    sq = np.einsum('ij,ij->i', x, x)
    for s in range(0, rows.size, chunk):
      r, c = rows[s : s + chunk], cols[s : s + chunk]
      dot = np.einsum('ij,ij->i', x[r], x[c])
      out[s : s + chunk] = _raw_from_dot(dot, sq[r], sq[c], mode, square)
    return out
  x_dev = jnp.asarray(x)
  sq_dev = jnp.sum(x_dev * x_dev, axis=1)
  kernel = _get_pair_kernel(chunk, mode, square)
  for s in range(0, rows.size, chunk):
    e = min(s + chunk, rows.size)
    r = np.zeros(chunk, np.int32)
    c = np.zeros(chunk, np.int32)
    r[: e - s] = rows[s:e]
    c[: e - s] = cols[s:e]
    out[s:e] = np.asarray(kernel(x_dev, sq_dev, r, c))[: e - s]
  return out


# --------------------------------------------------------------------------------------------
# k-reciprocal encoding (docs/reference.md section 4, steps 2-5)
# --------------------------------------------------------------------------------------------


def _reciprocal_mask(nbr: np.ndarray, kk: int, block: int = 4096) -> np.ndarray:
  """mask[i, a] = (nbr[i, a] is a k-reciprocal neighbour of i), for a < kk = k + 1.

  R(i, k) = {j in the first k+1 neighbours of i : i in the first k+1 neighbours of j}.
  """
  n = nbr.shape[0]
  out = np.empty((n, kk), bool)
  for b0 in range(0, n, block):
    b1 = min(n, b0 + block)
    back = nbr[nbr[b0:b1, :kk], :kk]  # (B, kk, kk)
    out[b0:b1] = (back == np.arange(b0, b1, dtype=nbr.dtype)[:, None, None]).any(-1)
  return out


def _k_reciprocal_v(
    x: np.ndarray, table: NeighbourTable, k1: int, mode: str, square: bool, block: int = 1024
) -> sp.csr_matrix:
  """Sparse V (docs/reference.md section 4, steps 2-4) from the neighbour table, vectorised per block.

  Expansion: for each c in R(i, k1), add R(c, round(k1/2)) when
  |R(c, k1/2) & R(i, k1)| > 2/3 |R(c, k1/2)| (the reference's float comparison); unique union;
  V(i, j) = exp(-o(i,j)) / sum over the set, o normalised by the row max.
  """
  nbr = table.indices
  n, k = nbr.shape
  k1n = min(k1 + 1, k)
  kh = int(np.around(k1 / 2.0))  # the reference's int(np.around(k1/2.))
  khn = min(kh + 1, k)
  rec1 = _reciprocal_mask(nbr, k1n)
  rech = _reciprocal_mask(nbr, khn)
  rows_l, cols_l, raw_l, found_l = [], [], [], []
  for b0 in range(0, n, block):
    b1 = min(n, b0 + block)
    nb = nbr[b0:b1]
    bsz = b1 - b0
    f = nb[:, :k1n]
    r1 = rec1[b0:b1]
    big_r = np.where(r1, f, -1)  # R(i, k1), -1 = not a member
    rcm = rech[f]  # (B, k1n, khn): membership of R(c, kh) for each candidate c
    rc = np.where(rcm, nbr[f, :khn], -1)
    size = rcm.sum(-1)
    # |R(c, k1/2) & R(i, k1)|: membership tests looped over the (small) R(i, k1) slots,
    # each a vectorised elementwise pass (much faster than a reduction over a tiny axis)
    member = np.zeros(rc.shape, bool)
    for a in range(k1n):
      member |= rc == big_r[:, a, None, None]
    inter = (member & rcm).sum(-1)
    accept = r1 & (inter > 2.0 / 3.0 * size)
    cand = np.concatenate([big_r, np.where(accept[..., None], rc, -1).reshape(bsz, -1)], axis=1)
    cand.sort(axis=1)
    keep = cand >= 0
    keep[:, 1:] &= cand[:, 1:] != cand[:, :-1]
    found = np.zeros(cand.shape, bool)  # look the distances up in the neighbour table
    rawv = np.zeros(cand.shape, np.float32)
    for a in range(k):
      hit = cand == nb[:, a, None]
      found |= hit
      np.copyto(rawv, table.raw[b0:b1, a, None], where=hit)
    r, c = np.nonzero(keep)
    rows_l.append((r + b0).astype(np.int32))
    cols_l.append(cand[r, c].astype(np.int32))
    raw_l.append(rawv[r, c])
    found_l.append(found[r, c])
  rows = np.concatenate(rows_l)
  cols = np.concatenate(cols_l)
  raw = np.concatenate(raw_l)
  found = np.concatenate(found_l)
  miss = ~found
  if miss.any():  # expansion members outside the K-NN table: exact dot products
    raw[miss] = _pair_raw(x, rows[miss], cols[miss], mode, square)
  o = raw / table.row_max[rows]  # float32, like the reference's normalised matrix
  w = np.exp(-o.astype(np.float64))
  row_sum = np.bincount(rows, weights=w, minlength=n)
  data = w / row_sum[rows]
  indptr = np.zeros(n + 1, np.int64)
  np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
  return sp.csr_matrix((data, cols, indptr), shape=(n, n))


def _query_expansion(v: sp.csr_matrix, nbr: np.ndarray, k2: int) -> sp.csr_matrix:
  """V(i,:) := mean of V(n,:) over the first k2 neighbours n of i (self included); sparse."""
  n = v.shape[0]
  if k2 == 1:  # the reference skips query expansion for k2 == 1
    out = v.copy()
  else:
    k2n = min(k2, nbr.shape[1])
    a = sp.csr_matrix(
        (
            np.full(n * k2n, 1.0 / k2n),
            nbr[:, :k2n].ravel().astype(np.int64),
            np.arange(0, n * k2n + 1, k2n, dtype=np.int64),
        ),
        shape=(n, n),
    )
    out = (a @ v).tocsr()
  out.sort_indices()
  return out


def _jaccard_numerator_blocks(
    vq: sp.csr_matrix,
    rows_lo: int,
    rows_hi: int,
    col_lo: int,
    symmetric: bool,
    triple_budget: int = 1_500_000,
    acc_budget: int = 1_000_000,
):
  """Yield (r0, r1, c0, m): m (r1-r0, N-c0) float64 with m[a, b] = sum_k min(V_ik, V_jk) for
  i = r0 + a, j = c0 + b.

  Only pairs sharing a non-zero column contribute: for each non-zero (i, k) of a block of rows,
  all rows j of column k (the CSC of V, rows sorted) are enumerated in bulk (repeat/cumsum index
  arithmetic) and min(V_ik, V_jk) is accumulated with np.bincount into a dense block of at most
  ``acc_budget`` cells (cache-resident). ``symmetric`` keeps only j >= i (c0 = r0; the caller
  mirrors); otherwise j >= col_lo (c0 = col_lo). Work is sum over rows of sum_k |column k|.
  """
  n = vq.shape[1]
  if not vq.has_sorted_indices:
    vq = vq.copy()
    vq.sort_indices()
  # CSC of V carrying CSR entry ids (scipy's counting sort keeps rows ascending per column).
  csc = sp.csr_matrix(
      (np.arange(vq.nnz, dtype=np.int64), vq.indices, vq.indptr), shape=vq.shape
  ).tocsc()
  perm = csc.data
  cindptr = csc.indptr.astype(np.int64)
  crow = csc.indices.astype(np.int64)
  cval = vq.data[perm]
  if symmetric:
    # first j >= i in column k is entry (i, k) itself: its CSC position
    start_of_entry = np.empty(vq.nnz, np.int64)
    start_of_entry[perm] = np.arange(vq.nnz, dtype=np.int64)
  else:
    below = np.concatenate([[0], np.cumsum(crow < col_lo)])
    col_first = cindptr[:-1] + (below[cindptr[1:]] - below[cindptr[:-1]])
  del csc, perm
  indptr = vq.indptr.astype(np.int64)
  chunk_rows = 4096
  for r in range(rows_lo, rows_hi, chunk_rows):
    r_end = min(rows_hi, r + chunk_rows)
    a, b = indptr[r], indptr[r_end]
    ks = vq.indices[a:b].astype(np.int64)
    vs = vq.data[a:b]
    ri = np.repeat(np.arange(r, r_end, dtype=np.int64), np.diff(indptr[r : r_end + 1]))
    pos = start_of_entry[a:b] if symmetric else col_first[ks]
    cnt = cindptr[ks + 1] - pos
    row_tot = np.bincount(ri - r, weights=cnt, minlength=r_end - r)
    cum = np.concatenate([[0.0], np.cumsum(row_tot)])
    s0 = r
    while s0 < r_end:
      c0 = s0 if symmetric else col_lo
      ncols = n - c0
      lim = cum[s0 - r] + triple_budget
      s1 = int(np.searchsorted(cum, lim, side='right')) - 1 + r
      s1 = max(s0 + 1, min(s1, s0 + max(1, acc_budget // max(ncols, 1)), r_end))
      e0, e1 = indptr[s0] - a, indptr[s1] - a
      c = cnt[e0:e1]
      total = int(c.sum())
      nrow = s1 - s0
      if total == 0:
        yield s0, s1, c0, np.zeros((nrow, ncols))
        s0 = s1
        continue
      start = np.cumsum(c) - c
      p = np.repeat(pos[e0:e1] - start, c)  # CSC positions of the partners j
      p += np.arange(total, dtype=np.int64)
      vals = np.repeat(vs[e0:e1], c)
      np.minimum(vals, cval[p], out=vals)
      key = np.repeat((ri[e0:e1] - s0) * ncols - c0, c)
      key += crow[p]
      acc = np.bincount(key, weights=vals, minlength=nrow * ncols)
      del p, vals, key
      yield s0, s1, c0, acc.reshape(nrow, ncols)
      s0 = s1


def _k_reciprocal_sparse(
    x: np.ndarray, k1: int, k2: int, mode: str, square: bool, tile_size: int, emit=None
):
  """Steps 1-5 of docs/reference.md section 4: (neighbour table, query-expanded sparse V)."""
  if k1 < 1 or k2 < 1:
    raise ValueError(f'k1 and k2 must be >= 1, got {k1}, {k2}')
  table = nearest_neighbours(
      x, max(k1 + 1, k2), mode=mode, square=square, tile_size=tile_size, emit=emit
  )
  t0 = time.perf_counter()
  v = _k_reciprocal_v(x, table, k1, mode, square)
  vq = _query_expansion(v, table.indices, k2)
  _log.info(
      'k-reciprocal V: %.1f nnz/row, after query expansion %.1f nnz/row: %.2f s',
      v.nnz / max(1, v.shape[0]),
      vq.nnz / max(1, vq.shape[0]),
      time.perf_counter() - t0,
  )
  return table, vq


# --------------------------------------------------------------------------------------------
# Training-time Jaccard distance (MMT / ABMT clustering distance)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JaccardGraph:
  """Sparse k-reciprocal Jaccard distance (docs/reference.md section 4).

  ``matrix`` (N x N CSR, float32, symmetric) stores every pair with Jaccard distance < 1, i.e.
  every pair whose V rows overlap, *including exact zeros* (the diagonal and identical V rows):
  a stored 0 is a real distance of 0, a missing pair has the implicit value
  ``implicit_value(i, j)``: 1 without source mixing, ``(1 - lam) + lam (s_i + s_j)`` with it
  (ABMT, docs/reference.md section 4 step 7). ``source_term`` is s (N,), scaled by its max, or None.
  """

  matrix: sp.csr_matrix
  source_term: np.ndarray | None = None
  lam: float = 0.0

  @property
  def num_samples(self) -> int:
    return self.matrix.shape[0]

  @property
  def base(self) -> float:
    """The Jaccard part of a missing pair's value: (1 - lam) * 1."""
    return 1.0 - self.lam if self.source_term is not None else 1.0

  def implicit_value(self, rows, cols) -> np.ndarray:
    """Distance of pairs that are not stored (float32, same arithmetic everywhere)."""
    rows = np.asarray(rows)
    if self.source_term is None:
      return np.ones(rows.shape, np.float32)
    s = self.source_term.astype(np.float64)
    return (self.base + self.lam * (s[rows] + s[np.asarray(cols)])).astype(np.float32)

  def implicit_bounds(self) -> tuple[float, float]:
    """(lower, upper) bounds of the implicit values over all pairs i != j."""
    if self.source_term is None or self.num_samples < 2:
      return 1.0, 1.0
    s64 = np.sort(self.source_term).astype(np.float64)
    lo = np.float32(self.base + self.lam * (s64[0] + s64[1]))
    hi = np.float32(self.base + self.lam * (s64[-1] + s64[-2]))
    return float(lo), float(hi)

  def to_dense(self) -> np.ndarray:
    """The dense (N, N) float32 matrix the reference would build (for tests / small N)."""
    n = self.num_samples
    if self.source_term is None:
      dense = np.ones((n, n), np.float32)
    else:
      s = self.source_term.astype(np.float64)
      dense = (self.base + self.lam * (s[:, None] + s[None, :])).astype(np.float32)
    coo = self.matrix.tocoo()
    dense[coo.row, coo.col] = coo.data
    return dense


def source_term(target_features, source_features, *, block_size: int = 1024) -> np.ndarray:
  """ABMT's source distance s_i = min_s (1 - exp(-|t_i - s|^2)), divided by max_i s_i.

  |t|^2 + |s|^2 - 2 t.s as in the reference; the min is taken over the squared distance first
  (1 - exp(-x) is increasing), blocked over target rows with JAX.
  """
  t = _f32(target_features)
  src = jnp.asarray(_f32(source_features))
  s_sq = jnp.sum(src * src, axis=1)
  out = np.empty(t.shape[0], np.float32)
  for s, e, block in _iter_min_blocks(t, src, s_sq, block_size):
    out[s:e] = block
  out = (1.0 - np.exp(-out.astype(np.float64))).astype(np.float32)
  mx = out.max()
  return out / mx if mx > 0 else out


@jax.jit
def _min_sqdist_tile(t, src, s_sq):
  d = jnp.sum(t * t, axis=1, keepdims=True) + s_sq[None, :] - 2.0 * full_dot_t(t, src)
  return jnp.min(d, axis=1)


def _iter_min_blocks(t, src, s_sq, block_size):
  nt = t.shape[0]
  block_size = max(1, min(block_size, nt))
  tp = _pad_rows(t, block_size)
  for s in range(0, nt, block_size):
    e = min(s + block_size, nt)
    res = _min_sqdist_tile(jnp.asarray(tp[s : s + block_size]), src, s_sq)
    yield s, e, np.asarray(res)[: e - s]


def _assemble_symmetric(n: int, blocks: list, window: int = 1 << 21) -> sp.csr_matrix:
  """Full symmetric CSR from upper-triangle blocks, built index by index (explicit zeros kept).

  ``blocks``: list of (r0, r1, row_counts, cols int32, vals float32) in increasing row order,
  each row's columns ascending and >= the row (diagonal included); consumed (emptied), so peak
  memory is about the output plus the upper half. Row r of the output is [its strictly-lower
  entries = column r of the upper half, ascending; its upper entries]. Each block's strictly
  upper part is transposed with scipy's O(nnz) CSR->CSC counting sort (it moves entries without
  dropping stored zeros); the transposed pieces are then written window by window of output
  rows (cache-friendly), in block order, which keeps every row's columns ascending.
  """
  rc_all = np.zeros(n, np.int64)
  cnt_l = np.zeros(n, np.int64)
  for r0, r1, rc, cols, _ in blocks:
    rc_all[r0:r1] = rc
    rows = np.repeat(np.arange(r0, r1, dtype=np.int32), rc)
    cnt_l += np.bincount(cols[cols != rows], minlength=n)
  indptr = np.zeros(n + 1, np.int64)
  np.cumsum(cnt_l + rc_all, out=indptr[1:])
  indices = np.empty(int(indptr[-1]), np.int32)
  data = np.empty(int(indptr[-1]), np.float32)
  pieces = []  # transposed strictly-upper parts: (first row, CSC indptr, rows, values)
  blocks.reverse()
  while blocks:
    group = [blocks.pop()]  # merge small consecutive blocks (fewer pieces)
    while blocks and sum(g[3].size for g in group) + blocks[-1][3].size <= window:
      group.append(blocks.pop())
    r0, r1 = group[0][0], group[-1][1]
    rc = np.concatenate([g[2] for g in group])
    cols = np.concatenate([g[3] for g in group])
    vals = np.concatenate([g[4] for g in group])
    del group
    # upper parts: row r's entries go after its cnt_l[r] lower entries (slice copies)
    starts = (indptr[r0:r1] + cnt_l[r0:r1]).tolist()
    offs = np.concatenate([[0], np.cumsum(rc)]).tolist()
    for a, o0, o1 in zip(starts, offs[:-1], offs[1:]):
      indices[a : a + o1 - o0] = cols[o0:o1]
      data[a : a + o1 - o0] = vals[o0:o1]
    rows = np.repeat(np.arange(r0, r1, dtype=np.int32), rc)
    strict = cols != rows
    first = np.asarray(offs[:-1], np.int64)
    has_diag = (rc > 0) & (
        cols[np.minimum(first, max(cols.size - 1, 0))] == np.arange(r0, r1)
    )  # the diagonal is a row's first entry
    bptr = np.zeros(r1 - r0 + 1, np.int64)
    np.cumsum(rc - has_diag, out=bptr[1:])
    t = sp.csr_matrix((vals[strict], cols[strict], bptr), shape=(r1 - r0, n)).tocsc()
    pieces.append((r0, t.indptr.astype(np.int64), t.indices + np.int32(r0), t.data))
    del t, rows, strict, cols, vals
  fill = indptr[:-1].copy()  # next free slot of each row's lower part
  lower_ptr = np.concatenate([[0], np.cumsum(cnt_l)])
  a = 0
  while a < n:  # output row windows of about `window` lower entries
    b = int(np.searchsorted(lower_ptr, lower_ptr[a] + window, side='right')) - 1
    b = min(max(b, a + 1), n)
    for r0, tp, ti, tv in pieces:
      if r0 >= b:
        break
      lo, hi = tp[a], tp[b]
      if lo == hi:
        continue
      cc = np.diff(tp[a : b + 1])
      dest = np.repeat(fill[a:b] - tp[a:b], cc)
      dest += np.arange(lo, hi, dtype=np.int64)
      indices[dest] = ti[lo:hi]
      data[dest] = tv[lo:hi]
      fill[a:b] += cc
    a = b
  m = sp.csr_matrix((data, indices, indptr), shape=(n, n))
  m.has_sorted_indices = True
  return m


def jaccard_distance(
    features,
    k1: int = 20,
    k2: int = 6,
    source_features=None,
    lam: float = 0.0,
    *,
    tile_size: int = 2048,
) -> JaccardGraph:
  """MMT/ABMT's k-reciprocal Jaccard distance as a sparse graph (docs/reference.md section 4).

  Same values as the reference's dense ``compute_jaccard_dist`` (negative values clamped to 0,
  source mixing d = (1 - lam) d_J + lam (s_i + s_j) when ``lam > 0``), with memory ~ N x k
  instead of several N x N matrices. Returns a `JaccardGraph`; pairs with d_J = 1 are implicit.
  """
  x = _f32(features)
  n = x.shape[0]
  if not 0.0 <= lam < 1.0:
    raise ValueError(f'lam must be in [0, 1), got {lam}')
  s_term = None
  if lam > 0:
    if source_features is None:
      raise ValueError('lam > 0 needs source_features (ABMT source mixing)')
    s_term = source_term(x, source_features)
  _, vq = _k_reciprocal_sparse(x, k1, k2, 'train', False, tile_size)
  s64 = s_term.astype(np.float64) if s_term is not None else None
  t0 = time.perf_counter()
  blocks = []
  for r0, r1, c0, m in _jaccard_numerator_blocks(vq, 0, n, 0, symmetric=True):
    ncols = m.shape[1]
    flat = np.flatnonzero(m)
    mv = m.ravel()[flat]
    d = 1.0 - mv / (2.0 - mv)
    np.maximum(d, 0.0, out=d)  # the reference clamps negative values to 0
    rloc = flat // ncols
    cols = (flat - rloc * ncols + c0).astype(np.int32)
    rc = np.bincount(rloc, minlength=r1 - r0)
    if s64 is not None:
      d = (1.0 - lam) * d + lam * (s64[rloc + r0] + s64[cols])
    blocks.append((r0, r1, rc, cols, d.astype(np.float32)))
    del m, flat, mv, d, rloc
  t1 = time.perf_counter()
  mat = _assemble_symmetric(n, blocks)
  _log.info(
      'Jaccard numerator %.2f s, symmetric CSR assembly %.2f s: %d stored pairs ' '(%.1f per row)',
      t1 - t0,
      time.perf_counter() - t1,
      mat.nnz,
      mat.nnz / max(1, n),
  )
  return JaccardGraph(matrix=mat, source_term=s_term, lam=float(lam) if s_term is not None else 0.0)


# --------------------------------------------------------------------------------------------
# Test-time re-ranking
# --------------------------------------------------------------------------------------------


class _RerankSink:
  """Receives raw distance tiles of the neighbour pass and keeps the query x gallery part."""

  def __init__(self, nq: int, n: int, out: np.ndarray):
    self.nq, self.n, self.out = nq, n, out

  def _parts(self, r0, c0, t):
    r_hi = min(r0 + t, self.nq, self.n)
    c_lo, c_hi = max(c0, self.nq), min(c0 + t, self.n)
    return r_hi, c_lo, c_hi

  def wants(self, i0, j0, t):
    a = self._parts(i0, j0, t)
    b = self._parts(j0, i0, t)
    return (i0 < a[0] and a[1] < a[2]) or (i0 != j0 and j0 < b[0] and b[1] < b[2])

  def __call__(self, i0, j0, raw):
    t = raw.shape[0]
    q = self.nq
    r_hi, c_lo, c_hi = self._parts(i0, j0, t)
    if i0 < r_hi and c_lo < c_hi:
      self.out[i0:r_hi, c_lo - q : c_hi - q] = raw[: r_hi - i0, c_lo - j0 : c_hi - j0]
    if i0 != j0:
      r_hi, c_lo, c_hi = self._parts(j0, i0, t)
      if j0 < r_hi and c_lo < c_hi:
        self.out[j0:r_hi, c_lo - q : c_hi - q] = raw[c_lo - i0 : c_hi - i0, : r_hi - j0].T


def rerank(
    query_features,
    gallery_features,
    k1: int = 20,
    k2: int = 6,
    lam: float = 0.3,
    *,
    square_distances: bool = True,
    tile_size: int = 2048,
) -> np.ndarray:
  """k-reciprocal re-ranking (Zhong et al. 2017) of query x gallery: (Q, G) float32 distances.

  Reproduces MMT's ``re_ranking(q_g, q_q, g_g)`` as called by its evaluator on squared-Euclidean
  distances: V and query expansion over query + gallery, Jaccard rows only for the queries,
  final = (1 - lam) Jaccard + lam original, no clamping (docs/reference.md section 4, last paragraph).

  ``square_distances=True`` (default, reference behaviour) reproduces a quirk: the reference
  squares its input distances (``np.power(d, 2)``, meant for Euclidean distances), but MMT passes
  *squared* Euclidean distances, so the 'original distance' is |x_i - x_j|^4 divided by its row
  maximum; ``False`` uses the squared Euclidean distance once, as Zhong et al. intended. The
  neighbour order is the same either way; the V weights and the lam-mixed term differ.
  (MMT's own evaluator crashes before reaching ``re_ranking``: its ``pairwise_distance``
  returns a tuple for query/gallery inputs and ``.numpy()`` is called on it; this follows
  ``re_ranking`` as written, fed the squared distances the evaluator computes.) The reference
  normalises by column maxima of the stacked q/g matrix; that matrix is symmetric, so row
  maxima (which the blocked pass computes) are the same.

  Memory: the output (Q x G float32) plus O(N k) for the k-reciprocal structures; never N x N.
  """
  q = _f32(query_features)
  g = _f32(gallery_features)
  nq, ng = q.shape[0], g.shape[0]
  x = np.concatenate([q, g], axis=0)
  n = nq + ng
  out = np.empty((nq, ng), np.float32)
  sink = _RerankSink(nq, n, out)
  table, vq = _k_reciprocal_sparse(x, k1, k2, 'test', square_distances, tile_size, emit=sink)
  lam32 = np.float32(lam)
  one_minus = np.float32(1.0 - lam)
  for r0 in range(0, nq, 1024):  # normalised original distance (reference: / column max, .T)
    r1 = min(nq, r0 + 1024)
    out[r0:r1] /= table.row_max[r0:r1, None]
  t0 = time.perf_counter()
  for r0, r1, _, m in _jaccard_numerator_blocks(vq, 0, nq, nq, symmetric=False):
    jac = (1.0 - m / (2.0 - m)).astype(np.float32)  # no clamp in the reference's re_ranking
    out[r0:r1] = jac * one_minus + out[r0:r1] * lam32
  _log.info(
      're-ranking Jaccard rows for %d queries x %d gallery: %.2f s',
      nq,
      ng,
      time.perf_counter() - t0,
  )
  return out


_rerank_fn = rerank  # `evaluate` has a parameter named `rerank`
