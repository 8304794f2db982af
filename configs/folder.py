"""Your own cameras: a torchreid model adapted to a folder of unlabelled person crops and written
back as a torchreid file. Every image under `config.data.target_root` is read, recursively; the
first-level sub-folder is its camera. Nothing is evaluated (no labels) unless
`config.data.val_root` names a labelled set in Market layout; the last epoch's model is kept as
<workdir>/model.msgpack and <workdir>/model.pth. Settings as configs/msmt2market.py (3 epochs x
100 iterations of batch 32 at 256x128).

  python -m jaxreid.main --config=configs/folder.py --config.data.target_root=crops \
      --config.init.pretrained=osnet_x0_25_msmt17.pth --workdir=runs/my_cameras
  # ABMT by default; :mmt,dbscan finds the number of identities too; the K-means methods
  # (:mmt, :mean_teacher, :cluster_baseline) need --config.cluster.num_clusters=N

Measured: Market-1501's training images with their labels removed, adapted from torchreid's MSMT17
OSNet x0.25 on a 2-core CPU, scored on Market-1501's test split: docs/results.md, "From an
unlabelled folder".
"""

from configs import base


def get_config(arg: str = 'abmt'):
  method, options = base.parse_arg(arg, 'abmt', ('dbscan',))
  c = base.real_task(method, options, 'msmt17', 'folder', num_clusters=0)  # K-means: you say
  base.from_published_model(c, 'osnet_x0_25', 'osnet_x0_25_msmt17.pth')
  c.cluster.lam = 0.0  # no source images to mix into ABMT's clustering
  c.export.torch_format = 'torchreid'
  return c
