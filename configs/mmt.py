"""MMT (Ge et al., ICLR 2020): two networks, two EMA teachers, mutual soft supervision.

`--config=configs/mmt.py` runs on the built-in synthetic world (K-means);
`configs/mmt.py:duke2market` (or market2duke, market2msmt, duke2msmt, cuhk2pku, pku2cuhk) uses the
papers' settings on real data; append `,dbscan` for MMT with DBSCAN on the Jaccard distance.
"""

from configs import default


def get_config(arg: str = ''):
  c = default.clustering_method_config('mmt', arg)
  c.loss.soft_ce_weight = 0.5
  c.loss.soft_tri_weight = 0.8
  return c
