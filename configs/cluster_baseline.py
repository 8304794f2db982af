"""Clustering baseline: one network trained on pseudo-labels with CE + softmax-triplet, no
teacher (MMT with both soft weights 0 and the EMA off). Options as configs/mmt.py."""

from configs import default


def get_config(arg: str = ''):
  c, task, options = default.from_arg('cluster_baseline', arg, ('dbscan',))
  if 'dbscan' in options:
    default.use_dbscan(c, task)
  return c
