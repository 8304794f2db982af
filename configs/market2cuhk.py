"""Market-1501 -> CUHK03 (detected) from a published model: torchreid's OSNet x0.25 trained on
Market-1501 adapted to CUHK03 without its labels, Market-1501 images mixed into ABMT's clustering
(lambda 0.1). 3 epochs x 100 iterations of batch 32 at 256x128, evaluated at the end; K-means
with 600 clusters, or DBSCAN (ABMT, `:mmt,dbscan`).

  python -m jaxreid.main --config=configs/market2cuhk.py          # ABMT; or :mmt, :mmt,dbscan, ...
  bash experiments/real_adaptation.sh market2cuhk                 # every method, two seeds

Measured on a 2-core CPU with the former OSNet head (`--config.model.head=fc_pre_bn`, the
triplet terms inert; not yet rerun with the default; docs/results.md; mAP of seeds 1 / 2): the
published model 3.0; ABMT
9.4 / 8.8 (20 / 26 min); MMT with DBSCAN 7.9 / 8.0; MMT 7.1 / 7.4; mean teacher 7.1 / 7.5;
clustering baseline 6.5 / 6.7.
"""

from configs import base


def get_config(arg: str = 'abmt'):
  method, options = base.parse_arg(arg, 'abmt', ('dbscan',))
  c = base.real_task(
      method, options, 'market1501', 'cuhk03_detected', num_clusters=600,
      rho_scale=base.rho_scale(9.7, 7477),
  )  # fmt: skip
  base.from_shared(c, 'source', 'market1501')
  base.from_shared(c, 'target', 'cuhk03_detected')
  base.from_published_model(c, 'osnet_x0_25', 'osnet_x0_25_market1501.pth')
  return c
