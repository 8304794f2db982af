"""ABMT (Chen et al., WACV 2021): one two-branch student, one EMA teacher, cross-branch supervision.

`--config=configs/abmt.py` runs on the built-in synthetic world; `configs/abmt.py:duke2market`
etc. use the papers' settings; `,unsupervised` is fully unsupervised ABMT (no source data,
lambda = 0, starting from `config.init.pretrained` weights).
"""

from configs import default


def get_config(arg: str = ''):
  c = default.get_config('abmt')
  parts = [p for p in (arg or '').split(',') if p]
  c.model.arch = 'abmt'
  c.pretrain.epochs = default.get_config().pretrain.epochs
  # DBSCAN on the k-reciprocal Jaccard distance with source mixing, eps re-estimated every epoch.
  c.cluster.update(dict(method='dbscan', lam=0.1, rho=2e-3, eps_every_epoch=True))
  # Loss weights default to the paper's L = (L_ce + L_sce) / 2 + L_stri; ablations set a group to
  # 0, e.g. --config.loss.soft_tri=0.0 (see jaxreid.objectives.weight_names('abmt')).
  task = next((p for p in parts if p in default.TASKS), None)
  if task:
    default.apply_task(c, task)
    c.model.ibn = False
    c.pretrain.epochs = 80
    c.pretrain.iters = 200
  if 'unsupervised' in parts:
    c.cluster.lam = 0.0
    c.init.skip_pretrain = True
  return c
