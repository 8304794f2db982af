"""The papers' Market-1501 -> DukeMTMC-reID experiment: ResNet-50 pre-trained on the labelled source
(80 epochs x 100 iterations; ABMT x 200), then adapted without labels (40 epochs x 400 iterations
of batch 64 at 256x128); K-means with 500 clusters, or DBSCAN (ABMT, `:mmt,dbscan`).

  python -m jaxreid.main --config=configs/market2duke.py:mmt --config.data.root=/data/reid \
      --config.init.pretrained=resnet50-imagenet.pth     # or :abmt, :mmt,dbscan, :pretrain, ...

The data sets are read from <root>/market1501/ and <root>/dukemtmc/. Published (docs/reference.md
section 7, mAP / top-1): MMT-500 63.1 / 76.8, ABMT 69.1 / 82.0. Cost: the adaptation projects to 14
min (MMT) and 11 min (ABMT) on one H100 in bfloat16 (docs/performance.md). DukeMTMC-reID was
withdrawn by its authors; its reader is kept for those who hold a copy.
"""

from configs import base


def get_config(arg: str = 'mmt'):
  method, options = base.parse_arg(arg, 'mmt', ('dbscan', 'abmt', 'unsupervised'))
  c = base.real_task(method, options, 'market1501', 'dukemtmc', num_clusters=500)
  base.papers_setting(c)
  if 'unsupervised' in options:  # fully unsupervised ABMT: no source data, from init weights
    c.cluster.lam = 0.0
    c.init.skip_pretrain = True
  return c
