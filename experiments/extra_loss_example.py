"""A loss of your own, worked through (README, "Your own loss"): MMT plus a classic batch-hard
margin triplet on each student's features, weighted by a new config field `margin_tri`.

  python -m jaxreid.main --config=experiments/extra_loss_example.py --config.loss.margin_tri=0.5

Whether it beats plain MMT beyond seed noise (docs/usage.md, "Comparing variants over seeds"):

  jaxreid-compare --config=configs/mmt.py --seeds=3 --out=compare/margin --variant=mmt \
      --variant='margin=--config=experiments/extra_loss_example.py --config.loss.margin_tri=0.5'

The config is MMT's with `config.loss.function` pointing at the function below; the function has
the signature of every method's loss, `(outputs, labels, weights) -> (total, metrics)`, and gets
every `config.loss` field as its weights (jaxreid/methods.py). Any MMT ablation still applies,
e.g. `--config.loss.soft_tri_weight=0`.
"""

from configs import mmt
from jaxreid import losses
from jaxreid import methods


def mmt_with_margin_triplet(outputs, labels, weights):
  total, metrics = methods.mmt_loss(outputs, labels, weights)
  if weights['margin_tri']:
    for net in ('student1', 'student2'):
      value = losses.margin_triplet(outputs[f'{net}/features'], labels.ids, margin=0.3)
      metrics[f'loss/margin_tri/{net}'] = value
      # named for the gradient diagnostics (grad_share/margin_tri/<net>; unnamed, it is 'other')
      metrics[f'{methods.WEIGHTED}margin_tri/{net}'] = weights['margin_tri'] * value
      total = total + metrics[f'{methods.WEIGHTED}margin_tri/{net}']
  metrics['loss/total'] = total
  return total, metrics


def get_config(arg: str = ''):
  c = mmt.get_config(arg)
  c.loss.function = 'experiments.extra_loss_example:mmt_with_margin_triplet'
  c.loss.margin_tri = 0.2
  return c
