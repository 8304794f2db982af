"""K-means with k-means++ initialisation, in JAX (the default) or with sklearn (the reference's).

MMT's main version (docs/reference.md section 3) clusters the target features with K-means,
K = 500..2000. The JAX backend runs on the accelerator (jitted greedy k-means++ and Lloyd
iterations with fixed shapes, the distances blocked over rows); the sklearn backend is the
reference's choice, kept to compare against.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans

from jaxreid.retrieval.distances import sqdist

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
