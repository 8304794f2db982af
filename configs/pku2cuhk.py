"""PKU-Reid -> CUHK03 (detected), the two small real sets in ../shared/data (Market layout), at a
budget that fits a CPU: ResNet-18 width 16 at 64x32 from random initialisation, pre-training 20 x
50 iterations, adaptation 10 x 50; K-means with 600 clusters (767 identities), or DBSCAN.

  python -m jaxreid.main --config=configs/pku2cuhk.py:mmt    # or :abmt, :mean_teacher, ...
  bash experiments/real_data.sh pku2cuhk                     # every method

Measured on one H100 (experiments/results_real_data.md): source only 1.0 mAP and every method
0.8-0.9: 592 PKU-Reid training images carry almost nothing to CUHK03.
"""

from configs import base


def get_config(arg: str = 'mmt'):
  method, options = base.parse_arg(arg, 'mmt', ('dbscan', 'abmt'))
  c = base.real_task(
      method, options, 'pku_reid', 'cuhk03_detected', num_clusters=600,
      rho_scale=base.rho_scale(9.7, 7477),
  )  # fmt: skip
  base.small_sets_setting(c)
  return c
