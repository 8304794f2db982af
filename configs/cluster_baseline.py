"""The clustering baseline on the built-in synthetic world: one network trained on K-means pseudo
labels with cross-entropy and a softmax triplet, no teacher (MMT with both soft weights 0).

  python -m jaxreid.main --config=configs/cluster_baseline.py [--config.seed=2]
  python -m jaxreid.main --config=configs/cluster_baseline.py:dbscan

Cost on a 2-core CPU: 2 min 49 s measured with compilation (seed 1, quiet machine); on this
world it gains 2.7 to 7.2 target mAP over seeds 1-3 (experiments/results_synthetic.md).
Real data: configs/<source>2<target>.py:cluster_baseline.
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config('cluster_baseline')
  if 'dbscan' in base.options(arg, ('dbscan',)):
    base.use_dbscan(c, rho=1.6e-3 * base.SYNTHETIC_RHO_SCALE)
  return c
