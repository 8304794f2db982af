"""Blocked exact nearest neighbours: step 1 of the k-reciprocal encoding (docs/reference.md,
section 4).

One pass over the symmetric similarity matrix (each tile X_I X_J^T computed once on the
accelerator and used for the rows of I and, transposed, of J) keeps, per row, the K nearest
neighbours by the reference's 'original distance' (`distances.raw_distance_from_dot`) and the row
maximum (the farthest point, needed for the reference's row normalisation). Device memory is
N x K plus two tiles, never N x N (the reference's dense matrices need 25 GB at N = 32,621).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxreid.metrics_writer import format_duration
from jaxreid.metrics_writer import log
from jaxreid.retrieval.distances import f32
from jaxreid.retrieval.distances import full_dot_t
from jaxreid.retrieval.distances import pad_rows
from jaxreid.retrieval.distances import raw_distance_from_dot

__all__ = ['NeighbourTable', 'nearest_neighbours']

_log = logging.getLogger(__name__)


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
  x = f32(features)
  n = x.shape[0]
  if mode not in ('train', 'test'):
    raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
  k = int(min(k, n))
  n_blocks = max(1, -(-n // max(8, tile_size)))
  tile = int(-(-n // (8 * n_blocks)) * 8)  # even split, multiple of 8: little padding
  xp = pad_rows(x, tile)
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
    raw_i = raw_distance_from_dot(s, ni[:, None], nj[None, :], mode, square)
    neg, pos = _smallest_k(jnp.where(vj[None, :], raw_i, jnp.inf), k, axis=1)
    mx = jnp.max(jnp.where(vj[None, :], raw_i, -jnp.inf), axis=1)
    vals, idx, rmax = update(vals, idx, rmax, neg, pos, mx, i0, j0)
    # rows of J against columns I, read column-wise from the same tile; on a diagonal tile
    # (i0 == j0) this would repeat the row update, so it is masked out (no separate compile)
    use = vi & (i0 != j0)
    raw_c = raw_distance_from_dot(s, nj[None, :], ni[:, None], mode, square)  # [a, b] = o(j_b, i_a)
    neg, pos = _smallest_k(jnp.where(use[:, None], raw_c, jnp.inf), k, axis=0)
    mx = jnp.max(jnp.where(use[:, None], raw_c, -jnp.inf), axis=0)
    vals, idx, rmax = update(vals, idx, rmax, neg, pos, mx, j0, i0)
    if emit:
      return vals, idx, rmax, raw_i
    return vals, idx, rmax

  return kernel
