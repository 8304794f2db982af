"""The papers' whole pipeline on real data, Market-1501 -> CUHK03 (detected): torchvision's
ImageNet MobileNetV2 pre-trained on Market-1501 (20 x 100 iterations at 256x128, the papers' lr
3.5e-4), then adapted 3 x 100; K-means with 600 clusters, or DBSCAN (ABMT, `:mmt,dbscan`).

  python -m jaxreid.main --config=configs/market2cuhk_imagenet.py:pretrain   # or :mmt, :abmt, ...
  bash experiments/imagenet_pipeline.sh                                      # every row

Measured on a 2-core CPU (experiments/results_real.md, "The papers' whole pipeline", one seed):
pre-training 42.7 mAP on Market itself, 4.9 directly on CUHK03 (55 min); adaptation lowers it at
this budget: clustering baseline 1.8, mean teacher 3.0, MMT 3.2; ABMT from its own two-branch
pre-training 4.4.
"""

from configs import base


def get_config(arg: str = 'mmt'):
  method, options = base.parse_arg(arg, 'mmt', ('dbscan', 'abmt'))
  c = base.real_task(
      method, options, 'market1501', 'cuhk03_detected', num_clusters=600,
      rho_scale=base.rho_scale(9.7, 7477),
  )  # fmt: skip
  base.from_shared(c, 'source', 'market1501')
  base.from_shared(c, 'target', 'cuhk03_detected')
  base.from_published_model(c, 'mobilenetv2', 'mobilenetv2_imagenet_features.pt')
  return c
