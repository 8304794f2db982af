"""Supervised source pre-training only (stage 1): CE + softmax-triplet, warm-up multi-step lr,
a no-grad target forward per iteration for the BN statistics. Reports source and target results.
`configs/pretrain.py:duke2market` for a real task; `,abmt` pre-trains ABMT's two-branch network.
"""

from configs import default


def get_config(arg: str = ''):
  c, task, options = default.from_arg('pretrain', arg, ('abmt',))
  if 'abmt' in options:
    c.model.arch = 'abmt'
  return c
