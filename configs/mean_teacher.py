"""Mean-teacher baseline: one network supervised by pseudo-labels and by its own EMA teacher
(MMT's loss with i = j)."""

from configs import default


def get_config(arg: str = ''):
  c = default.get_config('mean_teacher')
  parts = [p for p in (arg or '').split(',') if p]
  c.loss.soft_ce_weight = 0.5
  c.loss.soft_tri_weight = 0.8
  task = next((p for p in parts if p in default.TASKS), None)
  if task:
    default.apply_task(c, task)
  if 'dbscan' in parts:
    c.cluster.update(dict(method='dbscan', rho=1.6e-3, eps_every_epoch=False))
  return c
