"""MMT (Ge et al., ICLR 2020) on the built-in synthetic world: two networks pre-trained on the
source domain with different seeds, then adapted to the target domain with an EMA teacher each
and mutual soft supervision (eq. 9) on K-means pseudo labels.

  python -m jaxreid.main --config=configs/mmt.py [--config.seed=2]
  python -m jaxreid.main --config=configs/mmt.py:dbscan      # DBSCAN on the Jaccard distance

Cost on a 2-core CPU: 5 min 48 s measured on a fresh clone's first run, compilation and the
world's generation included (two pre-trainings of 10 x 30 steps, 10 epochs x 30 iterations).
Every seed starts from the same source models (pretrain.seed); seeds 1-3 adapt them from 37.4 to
53.8 / 53.9 / 51.8 target mAP (experiments/results_synthetic.md).
Real data: configs/<source>2<target>.py:mmt, e.g. configs/duke2market.py:mmt.
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config('mmt')
  if 'dbscan' in base.options(arg, ('dbscan',)):
    base.use_dbscan(c, rho=1.6e-3 * base.SYNTHETIC_RHO_SCALE)
  return c
