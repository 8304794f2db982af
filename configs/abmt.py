"""ABMT (Chen et al., WACV 2021): one two-branch student, one EMA teacher, cross-branch supervision.

`--config=configs/abmt.py` runs on the built-in synthetic world; `configs/abmt.py:duke2market`
etc. use the papers' settings; `,unsupervised` is fully unsupervised ABMT (no source data,
lambda = 0, starting from `config.init.pretrained` weights). `configs/abmt.py:folder` adapts a
torchreid OSNet to an unlabelled folder of crops (`--config.data.target_root=DIR`) and writes the
result as a torchreid file too (README, "Adapt a tracker's re-ID model to your cameras").
"""

from configs import default


def get_config(arg: str = ''):
  c, task, options = default.from_arg('abmt', arg, ('unsupervised',))
  c.model.arch = 'abmt'
  # DBSCAN on the k-reciprocal Jaccard distance with source mixing, eps re-estimated every epoch.
  default.use_dbscan(c, task, rho=2e-3, every_epoch=True)
  c.cluster.lam = 0.1
  # Loss weights default to the paper's L = (L_ce + L_sce) / 2 + L_stri; ablations set a group to
  # 0, e.g. --config.loss.soft_tri=0.0 (jaxreid.methods.METHODS['abmt'].weights lists the names).
  if task in ('market2duke', 'duke2market', 'market2msmt', 'duke2msmt'):
    c.pretrain.iters = 200  # ABMT pre-trains 80 x 200 iterations
  if task in ('msmt2market', 'folder'):  # no MSMT17 images to mix in: ABMT's source-free setting
    c.cluster.lam = 0.0
  if 'unsupervised' in options:
    c.cluster.lam = 0.0
    c.init.skip_pretrain = True
  return c
