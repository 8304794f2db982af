"""Mean-teacher baseline: one network supervised by pseudo-labels and by its own EMA teacher
(MMT's loss with i = j). Options as configs/mmt.py."""

from configs import default


def get_config(arg: str = ''):
  c, task, options = default.from_arg('mean_teacher', arg, ('dbscan',))
  c.loss.soft_ce_weight = 0.5
  c.loss.soft_tri_weight = 0.8
  if 'dbscan' in options:
    default.use_dbscan(c, task)
  return c
