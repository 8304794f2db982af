"""Supervised source pre-training only (stage 1) on the built-in synthetic world: cross-entropy
and softmax triplet, warm-up multi-step lr, a no-grad target forward per iteration for the
BatchNorm statistics. Reports source and target (source only) results.

  python -m jaxreid.main --config=configs/pretrain.py
  python -m jaxreid.main --config=configs/pretrain.py:abmt    # ABMT's two-branch network

Real data: configs/<source>2<target>.py:pretrain (`:pretrain,abmt` for the two-branch network).
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config('pretrain')
  if 'abmt' in base.options(arg, ('abmt',)):
    c.model.arch = 'abmt'
  return c
