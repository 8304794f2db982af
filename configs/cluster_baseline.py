"""Clustering baseline: one network trained on pseudo-labels with CE + softmax-triplet, no
teacher (MMT with both soft weights 0 and the EMA off)."""

from configs import default


def get_config(arg: str = ''):
  c = default.get_config('cluster_baseline')
  parts = [p for p in (arg or '').split(',') if p]
  task = next((p for p in parts if p in default.TASKS), None)
  if task:
    default.apply_task(c, task)
  if 'dbscan' in parts:
    c.cluster.update(dict(method='dbscan', rho=1.6e-3, eps_every_epoch=False))
  return c
