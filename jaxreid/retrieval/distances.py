"""Feature distances: the one implementation used on the host and in blocked device kernels.

Every distance between feature vectors outside the training losses is computed here. The matrix
ones share one formula and order of operations, |x|^2 + |y|^2 - 2 x.y (`sqdist_from_dot`: squared
Euclidean, 2 - 2cos for unit features, docs/reference.md section 5), with the products in full
float32 (`full_dot_t`, not TF32 on GPUs):

* evaluation distances, query x gallery, in blocks of query rows (`squared_distance`,
  `iter_squared_distance_blocks`; section 5);
* K-means assignments in `jaxreid.pseudo_labels.kmeans` (`sqdist`, traced inside its jitted loops;
  section 3);
* the distance of each point to its nearest member of a set (`min_squared_distance`: ABMT's
  source term, section 4 step 7);
* the reference's 'original distance' of the k-reciprocal encoding (`raw_distance_from_dot`,
  section 4 step 1), for tiles of the neighbour pass and for arbitrary pairs
  (`raw_distance_pairs`);
* distances between paired rows (`paired_distance`: the coupling diagnostic of ABMT Fig. 4).

Kept apart on purpose: `jaxreid.losses.pairwise_distance`, traced inside the differentiated losses
(sqrt, clamp and self-distance diagonal as in the reference's training loss, float64 under x64 for
gradient checks). `jaxreid.search.rank_gallery` still writes the formula out itself, in float64
on the host (so printed distances between identical images are exactly 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'f32',
    'pad_rows',
    'full_dot_t',
    'sqdist_from_dot',
    'sqdist',
    'raw_distance_from_dot',
    'iter_squared_distance_blocks',
    'squared_distance',
    'min_squared_distance',
    'raw_distance_pairs',
    'paired_distance',
]


def f32(a) -> np.ndarray:
  """A C-contiguous float32 host copy (or view) of ``a``."""
  return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def pad_rows(a: np.ndarray, multiple: int) -> np.ndarray:
  """``a`` with zero rows appended up to a multiple of ``multiple`` rows (fixed tile shapes)."""
  n = a.shape[0]
  n_pad = -(-n // multiple) * multiple
  if n_pad == n:
    return a
  out = np.zeros((n_pad,) + a.shape[1:], a.dtype)
  out[:n] = a
  return out


def full_dot_t(a, b):
  """a @ b.T in full float32, for every distance here and in clustering. On NVIDIA GPUs JAX's
  default precision runs float32 products on TF32 tensor cores (10-bit mantissa), which
  perturbs distances by ~1e-3 and can reorder near-ties; the reference evaluates in float32 (no
  effect on CPU)."""
  return jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)


def sqdist_from_dot(dot, row_sq, col_sq):
  """|x|^2 + |y|^2 - 2 x.y from dot products and squared norms (numpy or JAX, broadcasting).

  The reference evaluator's formula and order of operations (float32), kept everywhere so that
  every path gives the same values."""
  return row_sq + col_sq - 2.0 * dot


def sqdist(x, y, x_sq=None, y_sq=None):
  """(N, M) squared Euclidean distances of JAX rows x (N, D), y (M, D); traceable under jit.

  ``x_sq`` / ``y_sq``: the rows' squared norms when already known (computed otherwise)."""
  x_sq = jnp.sum(x * x, axis=1) if x_sq is None else x_sq
  y_sq = jnp.sum(y * y, axis=1) if y_sq is None else y_sq
  return sqdist_from_dot(full_dot_t(x, y), x_sq[:, None], y_sq[None, :])


def raw_distance_from_dot(s, n_row, n_col, mode: str, square: bool):
  """The reference's un-normalised 'original distance' for dot products s = x_i.x_j.

  n_row / n_col: the squared norms |x_i|^2, |x_j|^2 (broadcasting like s). mode 'train'
  (compute_jaccard_dist): o(i,j) = 2|x_j|^2 - 2 x_i.x_j. The reference computes
  2|x_i|^2 - 2 x_i.x_j, divides by the column max and transposes, which is this expression
  divided by its row max (identical to the symmetric form for unit features).
  mode 'test' (re_ranking): d = |x_i|^2 + |x_j|^2 - 2 x_i.x_j, squared again when ``square``
  (the reference's np.power(d, 2) applied to already squared distances).
  """
  if mode == 'train':
    return 2.0 * n_col - 2.0 * s
  d = sqdist_from_dot(s, n_row, n_col)
  return d * d if square else d


@jax.jit
def _sqdist_tile(q, g, g_sq):
  return sqdist(q, g, y_sq=g_sq)


@jax.jit
def _min_sqdist_tile(t, src, s_sq):
  return jnp.min(sqdist(t, src, y_sq=s_sq), axis=1)


def _iter_blocks(tile_fn, rows, others, block_size: int):
  """Yield (start, stop, host block) of ``tile_fn(row block, others, |others|^2)`` over blocks of
  ``rows`` (float32, JAX).

  ``others`` goes to the device once, with its squared norms. The rows are zero-padded to a whole
  number of blocks (one compiled shape) and the padding is cut from each result. Dispatch runs
  one block ahead, so the host work on block b overlaps the device work on block b + 1.
  """
  x, y = f32(rows), f32(others)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f'features must be (Q, D) and (G, D), got {x.shape} and {y.shape}')
  y_dev = jnp.asarray(y)
  y_sq = jnp.sum(y_dev * y_dev, axis=1)
  n = x.shape[0]
  block_size = max(1, min(block_size, n))
  padded = pad_rows(x, block_size)
  pending = None
  for start in range(0, n, block_size):
    res = tile_fn(jnp.asarray(padded[start : start + block_size]), y_dev, y_sq)
    if pending is not None:
      yield pending[0], pending[1], np.asarray(pending[2])[: pending[1] - pending[0]]
    pending = (start, min(start + block_size, n), res)
  if pending is not None:
    yield pending[0], pending[1], np.asarray(pending[2])[: pending[1] - pending[0]]


def _fill(out: np.ndarray, blocks) -> np.ndarray:
  for start, stop, block in blocks:
    out[start:stop] = block
  return out


def iter_squared_distance_blocks(query_features, gallery_features, block_size: int):
  """Yield (start, stop, host (rows, G) float32 block) of squared distances, computed with JAX."""
  return _iter_blocks(_sqdist_tile, query_features, gallery_features, block_size)


def squared_distance(q, g, *, block_size: int = 2048) -> np.ndarray:
  """Squared Euclidean distances (Q, G) as a host float32 array.

  |q|^2 + |g|^2 - 2 q.g, which is 2 - 2cos for unit vectors (docs/reference.md section 5).
  Computed with JAX (the accelerator when there is one) in blocks of query rows so the device
  only ever holds one (block_size, G) tile besides the gallery.
  """
  out = np.empty((len(q), len(g)), np.float32)
  return _fill(out, _iter_blocks(_sqdist_tile, q, g, block_size))


def min_squared_distance(features, points, *, block_size: int = 1024) -> np.ndarray:
  """(N,) float32: each feature row's squared Euclidean distance to its nearest row of
  ``points``, blocked over feature rows with JAX (device memory: one (block_size, M) tile)."""
  out = np.empty(len(features), np.float32)
  return _fill(out, _iter_blocks(_min_sqdist_tile, features, points, block_size))


@functools.lru_cache(maxsize=None)
def _get_pair_kernel(chunk: int, mode: str, square: bool):
  @jax.jit
  def kernel(x, sq, rows, cols):
    s = jnp.sum(x[rows] * x[cols], axis=1)
    return raw_distance_from_dot(s, sq[rows], sq[cols], mode, square)

  return kernel


def raw_distance_pairs(x: np.ndarray, rows, cols, mode, square, chunk=4096) -> np.ndarray:
  """`raw_distance_from_dot` for arbitrary pairs (rows[i], cols[i]) via gathered dot products.

  On an accelerator the gather runs in JAX; on the CPU backend numpy's row gathers + einsum are
  faster than XLA's gather, so the host does it (the features are on the host anyway).
  """
  out = np.empty(rows.size, np.float32)
  if rows.size == 0:
    return out
  if jax.default_backend() == 'cpu':
    sq = np.einsum('ij,ij->i', x, x)
    for s in range(0, rows.size, chunk):
      r, c = rows[s : s + chunk], cols[s : s + chunk]
      dot = np.einsum('ij,ij->i', x[r], x[c])
      out[s : s + chunk] = raw_distance_from_dot(dot, sq[r], sq[c], mode, square)
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


def paired_distance(a, b) -> np.ndarray:
  """(N,) float64 Euclidean distances |a_i - b_i| between paired rows of two (N, D) arrays.

  Taken from the difference, not from dot products: identical rows give exactly 0."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'feature shapes differ: {a.shape} vs {b.shape}')
  return np.linalg.norm(a - b, axis=1)
