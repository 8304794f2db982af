"""The mean-teacher baseline on the built-in synthetic world: one network supervised by K-means
pseudo labels and by its own EMA teacher (MMT's loss with i = j; the teacher sees a second view).

  python -m jaxreid.main --config=configs/mean_teacher.py [--config.seed=2]
  python -m jaxreid.main --config=configs/mean_teacher.py:dbscan

Cost on a 2-core CPU: about 4 minutes with compilation (3 min 50 s measured beside other jobs,
seed 1); on this world it stays at its source-only level (experiments/results_synthetic.md).
Real data: configs/<source>2<target>.py:mean_teacher.
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config('mean_teacher')
  if 'dbscan' in base.options(arg, ('dbscan',)):
    base.use_dbscan(c, rho=1.6e-3 * base.SYNTHETIC_RHO_SCALE)
  return c
