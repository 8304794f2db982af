"""Mean-teacher baseline: one network supervised by pseudo-labels and by its own EMA teacher
(MMT's loss with i = j). Options as configs/mmt.py."""

from configs import mmt


def get_config(arg: str = ''):
  c = mmt.get_config(arg)
  c.method = 'mean_teacher'
  return c
