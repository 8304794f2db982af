"""Supervised source pre-training only (stage 1): CE + softmax-triplet, warm-up multi-step lr,
a no-grad target forward per iteration for the BN statistics. Reports source and target results.
"""

from configs import default


def get_config(arg: str = ''):
  c = default.get_config('pretrain')
  parts = [p for p in (arg or '').split(',') if p]
  task = next((p for p in parts if p in default.TASKS), None)
  if task:
    default.apply_task(c, task)
  if 'abmt' in parts:
    c.model.arch = 'abmt'
  return c
