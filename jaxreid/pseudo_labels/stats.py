"""What is computed from pseudo-labels: contiguous labels, cluster centroids, and statistics
(with ground truth, the quality of the clustering)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics import normalized_mutual_info_score


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
