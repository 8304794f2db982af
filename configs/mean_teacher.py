"""Mean-teacher baseline: one network supervised by pseudo-labels and by its own EMA teacher
(MMT's loss with i = j). Options as configs/mmt.py."""

from configs import default


def get_config(arg: str = ''):
  c = default.clustering_method_config('mean_teacher', arg)
  c.loss.soft_ce_weight = 0.5
  c.loss.soft_tri_weight = 0.8
  return c
