"""How MMT's two clusterings of the synthetic target bridge cameras: K-means (the default) and
DBSCAN on the Jaccard distance (`configs/mmt.py:dbscan`), on a finished MMT run's two source
models' averaged target features. Prints, per clustering, the clusters, the noise share, the share
of clusters spanning two or more cameras, and the share of an identity's cross-camera and
same-camera image pairs that land in one cluster. Results: experiments/results_synthetic.md.

  python experiments/synthetic_cluster_span.py --kmeans_run=<record>/mmt/seed1 \\
      --dbscan_run=<record>/mmt_dbscan/seed1
(with the world in $JAXREID_DATA_CACHE as the runs had it)
"""

import argparse
import json
import os

import ml_collections
import numpy as np

from jaxreid import inference
from jaxreid import pseudo_labels
from jaxreid.data import synthetic
from jaxreid.extractor import FeatureExtractor
from jaxreid.features import average_features


def span(labels: np.ndarray, pid: np.ndarray, cam: np.ndarray) -> dict:
  ok = labels >= 0
  clusters = np.unique(labels[ok])
  together = (labels[:, None] == labels[None]) & ok[:, None] & ok[None]
  same_id = (pid[:, None] == pid[None]) & ~np.eye(len(pid), dtype=bool)
  cross = same_id & (cam[:, None] != cam[None])
  return dict(
      clusters=len(clusters),
      noise=float(1 - ok.mean()),
      multi_camera=float(np.mean([len(np.unique(cam[labels == c])) > 1 for c in clusters])),
      cross_camera_pairs=float(together[cross].mean()),
      same_camera_pairs=float(together[same_id & ~cross].mean()),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kmeans_run', required=True, help='a finished configs/mmt.py work dir')
  parser.add_argument('--dbscan_run', required=True, help='a finished configs/mmt.py:dbscan one')
  args = parser.parse_args()
  config = json.load(open(os.path.join(args.kmeans_run, 'config.json')))
  world = synthetic.ensure_world(**config['data']['synthetic'])
  folder = world / 'domain_b' / 'bounding_box_train'
  paths = sorted(str(p) for p in folder.glob('*.jpg'))
  pid, cam = np.array([inference.parse_market_name(p) for p in paths]).T
  models = sorted(
      os.path.join(args.kmeans_run, d, 'model.msgpack')
      for d in os.listdir(args.kmeans_run)
      if d.startswith('pretrain_seed')
  )
  features = average_features([FeatureExtractor(m)(paths) for m in models], renormalize=True)
  for name, run in (('K-means', args.kmeans_run), ('DBSCAN', args.dbscan_run)):
    cluster = json.load(open(os.path.join(run, 'config.json')))['cluster']
    labels, _, _ = pseudo_labels.generate(ml_collections.ConfigDict(cluster), features, seed=1)
    s = span(labels, pid, cam)
    print(
        f'{name}: {s["clusters"]} clusters, noise {s["noise"]:.2f}, clusters over >= 2 cameras '
        f'{s["multi_camera"]:.2f}, cross-camera pairs together {s["cross_camera_pairs"]:.2f}, '
        f'same-camera pairs together {s["same_camera_pairs"]:.2f}'
    )


if __name__ == '__main__':
  main()
