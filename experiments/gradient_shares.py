"""Which tensor each loss reads, checked by measurement: the scale of the triplet losses' input
and each weighted term's share of the gradient, per backbone and head (docs/reference.md
section 1; docs/results.md, "Every loss term").

  python experiments/gradient_shares.py [--data=../shared/data] [--weights=../shared/weights]

On P x K batches (8 identities x 4 images, true identities) of Market-1501's training images at
256x128: the published OSNet x0.25 (MSMT17) under both heads ('bnneck', 'fc_pre_bn'), ImageNet
MobileNetV2 and a randomly initialised ResNet-50, every adaptation method. Prints, per row, the
triplet features' mean norm, batch-hard d_ap / d_an, the softmax-triplet loss (ln 2 = 0.693 is
flat), and the shares (`jaxreid.adapt.gradient_shares_on`, augmented views as in training).
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from jaxreid import adapt
from jaxreid import checkpoint
from jaxreid import input_pipeline
from jaxreid import losses
from jaxreid import models
from jaxreid.data import readers

ROWS = (  # (backbone, head, weights file or '' for a random initialisation)
    ('osnet_x0_25', 'fc_pre_bn', 'osnet_x0_25_msmt17.pth'),
    ('osnet_x0_25', 'bnneck', 'osnet_x0_25_msmt17.pth'),
    ('mobilenetv2', 'bnneck', 'mobilenetv2_imagenet_features.pt'),
    ('resnet', 'bnneck', ''),
)
METHODS = ('mmt', 'abmt', 'mean_teacher', 'cluster_baseline')


def pk_batch(data_root: str, ids: int = 8, k: int = 4, seed: int = 0):
  """(images (ids*k, 256, 128, 3) uint8, labels 0..ids-1): k images of each of `ids` random
  Market-1501 training identities, from at least two cameras where it has them."""
  ds = readers.read_market1501(os.path.join(data_root, 'market1501'))
  rng = np.random.default_rng(seed)
  pids, cams = ds.train.pids, ds.train.camids
  chosen = [p for p in rng.permutation(np.unique(pids)) if len(np.unique(cams[pids == p])) > 1]
  paths, labels = [], []
  for label, pid in enumerate(chosen[:ids]):
    idx = np.flatnonzero(pids == pid)
    idx = idx[np.argsort(cams[idx] + rng.random(len(idx)))]  # cameras interleaved below
    pick = np.concatenate([idx[::2], idx[1::2]])[:k]
    paths += [ds.train.paths[i] for i in pick]
    labels += [label] * k
  images = input_pipeline.decode_images(paths, 256, 128)
  return images, np.asarray(labels)


def config_for(method: str, backbone: str, head: str, weights: str):
  c = base.get_config(method)
  c.data.height, c.data.width, c.data.crop_pad = 256, 128, 10
  c.model.backbone, c.model.head = backbone, head
  c.model.depth, c.model.width = 50, 64
  if method == 'abmt':
    c.model.arch = 'abmt'
  return c


def students_for(config, weights_dir: str, weights: str, images):
  model = models.create_model(config.model, num_classes=1)
  if weights:
    v = checkpoint.load_weights(os.path.join(weights_dir, weights), model, drop_classifier=True)
  else:
    from jaxreid import numpy_init

    v = numpy_init.init_variables(model, 0)
  if config.model.arch == 'abmt':
    from jaxreid import run

    v = run.warm_start_max_branch(model, v, images, 0, batches=4, batch=32)
  return [v] * (2 if config.method == 'mmt' else 1)


def triplet_scale(config, students, images, labels) -> dict:
  """Norm of the triplet losses' input, d_ap / d_an and the softmax-triplet loss (first branch,
  train mode, no augmentation)."""
  model = models.create_model(config.model, num_classes=1)
  out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      students[0], input_pipeline.normalize(images)
  )
  f = out['features'] if 'features' in out else out['avg/features']
  d = losses.pairwise_distance(f)
  mined = losses.batch_hard_mining(d, jnp.asarray(labels))
  d_ap, d_an = mined.d_ap, mined.d_an
  return dict(
      norm=float(jnp.mean(jnp.linalg.norm(f, axis=1))),
      d_ap=float(jnp.mean(d_ap)),
      d_an=float(jnp.mean(d_an)),
      tri=float(losses.softmax_triplet(f, jnp.asarray(labels))),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', default=base.SHARED_DATA)
  parser.add_argument('--weights', default=base.SHARED_WEIGHTS)
  parser.add_argument('--methods', default=','.join(METHODS))
  args = parser.parse_args()
  images, labels = pk_batch(args.data)
  print(f'batch: {len(labels)} Market-1501 training images, {labels.max() + 1} identities')
  for backbone, head, weights in ROWS:
    for method in args.methods.split(','):
      config = config_for(method, backbone, head, weights)
      students = students_for(config, args.weights, weights, images)
      scale = triplet_scale(config, students, images, labels)
      shares = adapt.gradient_shares_on(config, students, images, labels)
      text = ' '.join(f'{t} {s:.1%}' for t, s in shares.items())
      print(
          f'{backbone:12s} {head:9s} {method:16s} |f| {scale["norm"]:7.3f} d_ap/d_an '
          f'{scale["d_ap"]:.3f}/{scale["d_an"]:.3f} tri {scale["tri"]:.3f} | {text}',
          flush=True,
      )


if __name__ == '__main__':
  main()
