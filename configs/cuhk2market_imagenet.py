"""The papers' whole pipeline on real data, CUHK03 (detected) -> Market-1501: torchvision's
ImageNet MobileNetV2 pre-trained on CUHK03 (20 x 100 iterations at 256x128, the papers' lr
3.5e-4), then adapted 3 x 100; K-means with 500 clusters, or DBSCAN (ABMT, `:mmt,dbscan`).

  python -m jaxreid.main --config=configs/cuhk2market_imagenet.py:pretrain   # or :mmt, :abmt, ...

Not measured yet.
"""

from configs import base


def get_config(arg: str = 'mmt'):
  method, options = base.parse_arg(arg, 'mmt', ('dbscan', 'abmt'))
  c = base.real_task(method, options, 'cuhk03_detected', 'market1501', num_clusters=500)
  base.from_shared(c, 'source', 'cuhk03_detected')
  base.from_shared(c, 'target', 'market1501')
  base.from_published_model(c, 'mobilenetv2', 'mobilenetv2_imagenet_features.pt')
  return c
