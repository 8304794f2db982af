"""MMT (Ge et al., ICLR 2020): two networks, two EMA teachers, mutual soft supervision.

`--config=configs/mmt.py` runs on the built-in synthetic world (K-means);
`configs/mmt.py:duke2market` (or market2duke, market2msmt, duke2msmt, cuhk2pku, pku2cuhk) uses the
papers' settings on real data; append `,dbscan` for MMT with DBSCAN on the Jaccard distance.
"""

from configs import default


def get_config(arg: str = ''):
  c = default.get_config('mmt')
  parts = [p for p in (arg or '').split(',') if p]
  c.loss.soft_ce_weight = 0.5
  c.loss.soft_tri_weight = 0.8
  task = next((p for p in parts if p in default.TASKS), None)
  if task:
    default.apply_task(c, task)
  if 'dbscan' in parts:
    c.cluster.method = 'dbscan'
    c.cluster.rho = 1.6e-3
    c.cluster.eps_every_epoch = False  # eps fixed at epoch 0 (method.md section 3)
  return c
