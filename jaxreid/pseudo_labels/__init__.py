"""Pseudo-labels for the target domain (docs/reference.md section 3, step 2 of each MMT / ABMT
epoch): the target features clustered by K-means or by DBSCAN on the k-reciprocal Jaccard
distance, and what is computed from the labels.

`generate(config.cluster, features, seed=...)` is what an adaptation epoch calls; the parts are

  kmeans.py   K-means (JAX, or sklearn as the reference)
  dbscan.py   DBSCAN on the sparse Jaccard graph and the eps heuristic
  stats.py    contiguous labels, centroids (the classifier rows), statistics against ground truth

The functions `kmeans` and `dbscan` re-exported here take the names of their modules: import a
module's other names from the module itself (`from jaxreid.pseudo_labels.dbscan import ...`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from jaxreid import retrieval
from jaxreid.errors import ConfigError
from jaxreid.metrics_writer import format_duration
from jaxreid.metrics_writer import log
from jaxreid.pseudo_labels.dbscan import dbscan
from jaxreid.pseudo_labels.dbscan import estimate_eps
from jaxreid.pseudo_labels.kmeans import kmeans
from jaxreid.pseudo_labels.stats import centroids
from jaxreid.pseudo_labels.stats import cluster_stats
from jaxreid.pseudo_labels.stats import relabel_contiguous

__all__ = [
    'centroids',
    'cluster_stats',
    'dbscan',
    'estimate_eps',
    'generate',
    'kmeans',
    'relabel_contiguous',
]


def generate(
    cluster_config,
    features: np.ndarray,
    *,
    source_features: np.ndarray | None = None,
    seed: int,
    eps: float | None = None,
) -> tuple[np.ndarray, float | None, dict[str, Any]]:
  """Pseudo-labels of `features` (N, D) as `cluster_config` (a run's `config.cluster`) says;
  returns (labels (N,) int64 contiguous with -1 for noise, eps, info).

  K-means: `num_clusters` clusters from `seed` (a run passes config.seed + epoch, so every epoch
  draws afresh and a resumed run draws the same). DBSCAN: on the k-reciprocal Jaccard distance,
  mixed with `source_features` when `lam` > 0 (ABMT); `eps` is estimated from `rho` when None
  or when `eps_every_epoch` (MMT fixes it at the first epoch: pass the returned eps back), else
  used as given; K-means returns `eps` unchanged. info holds 'cluster_seconds' and, for DBSCAN,
  'eps'. Raises `ConfigError` (`jaxreid.errors`) for another method.
  """
  cc = cluster_config
  t0 = time.time()
  info: dict[str, Any] = {}
  what = (
      f'K-means, {cc.num_clusters} clusters'
      if cc.method == 'kmeans'
      else f'k-reciprocal Jaccard (k1 {cc.k1}, k2 {cc.k2}) + DBSCAN'
  )
  log(f'[cluster] {what} of {features.shape[0]} x {features.shape[1]} features ...')
  if cc.method == 'kmeans':
    labels, _ = kmeans(
        features,
        cc.num_clusters,
        seed=seed,
        backend=cc.kmeans_backend,
        n_init=cc.get('kmeans_n_init', 1),
    )
  elif cc.method == 'dbscan':
    graph = retrieval.jaccard_distance(
        features,
        k1=cc.k1,
        k2=cc.k2,
        source_features=source_features if cc.lam > 0 else None,
        lam=cc.lam,
    )
    if eps is None or cc.eps_every_epoch:
      eps = float(estimate_eps(graph, cc.rho))
    labels = dbscan(graph, eps, min_samples=cc.min_samples)
    info['eps'] = eps
  else:
    raise ConfigError(f"config.cluster.method must be 'kmeans' or 'dbscan', got {cc.method!r}")
  labels = relabel_contiguous(np.asarray(labels))
  info['cluster_seconds'] = time.time() - t0
  log(f'[cluster] done in {format_duration(info["cluster_seconds"])}')
  return labels, eps, info
