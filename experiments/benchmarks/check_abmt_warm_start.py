"""ABMT started from a single-branch re-ID model: the joint, avg and max features' mAP with the
reference's random extra block and with jaxreid's warm start (`run.warm_start_max_branch`).

Usage: python experiments/benchmarks/check_abmt_warm_start.py \\
           --weights=../shared/weights/osnet_x0_25_msmt17.pth --data_root=../shared/data/pku_reid
"""

import argparse

import numpy as np

from jaxreid import checkpoint
from jaxreid import features
from jaxreid import input_pipeline
from jaxreid import models
from jaxreid import retrieval
from jaxreid import run
from jaxreid.data import load_dataset


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--weights', required=True)
  p.add_argument('--data_root', required=True)
  p.add_argument('--backbone', default='osnet_x0_25')
  args = p.parse_args()
  model = models.create_model(arch='abmt', backbone=args.backbone, num_classes=1)
  variables = checkpoint.load_weights(args.weights, model, drop_classifier=True)
  ds = load_dataset('market1501', args.data_root)
  train = input_pipeline.decode_images(ds.train.paths, 256, 128, progress=False)
  test = input_pipeline.decode_images(
      np.concatenate([ds.query.paths, ds.gallery.paths]), 256, 128, progress=False
  )
  embed = features.make_embed_fn(model)
  nq = len(ds.query.paths)
  ids = (ds.query.pids, ds.gallery.pids, ds.query.camids, ds.gallery.camids)

  def scores(v):
    f = features.extract_features(embed, [v], test, 32)
    parts = [('joint', f)] + list(zip(('avg', 'max'), features.branch_features(f)))
    return ', '.join(
        f'{name} {retrieval.market_metrics(x[:nq], x[nq:], *ids)["mAP"]:.1f}' for name, x in parts
    )

  print(f'random extra block (reference init): mAP {scores(variables)}')
  print(f'warm start: mAP {scores(run.warm_start_max_branch(model, variables, train, seed=1))}')


if __name__ == '__main__':
  main()
