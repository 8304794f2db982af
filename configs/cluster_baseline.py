"""Clustering baseline: one network trained on pseudo-labels with CE + softmax-triplet, no
teacher (MMT with both soft weights 0 and the EMA off). Options as configs/mmt.py."""

from configs import default


def get_config(arg: str = ''):
  c = default.clustering_method_config('cluster_baseline', arg)
  return c
