"""Checks of a config before any work starts: every error names the offending key."""

from __future__ import annotations

import importlib.util

import jax

from jaxreid import methods as methods_lib
from jaxreid import models
from jaxreid.errors import ConfigError

__all__ = ['ConfigError', 'validate_config']


# Every numeric config field's valid range (low, high or None, high included): checked before any
# work starts, so that e.g. pretrain.epochs=-1 cannot silently skip pre-training.
NUMERIC_RANGES = {
    'data.height': (16, None, True),
    'data.width': (16, None, True),
    'data.batch_size': (2, None, True),
    'data.num_instances': (1, None, True),
    'data.eval_batch_size': (1, None, True),
    'model.depth': (1, None, True),
    'model.width': (1, None, True),
    'model.last_stride': (1, 2, True),
    'model.dropout': (0.0, 1.0, False),
    'model.norm_group_size': (0, None, True),
    'pretrain.epochs': (0, None, True),
    'pretrain.iters': (1, None, True),
    'pretrain.lr': (0.0, None, True),
    'pretrain.warmup_epochs': (0, None, True),
    'pretrain.erasing_prob': (0.0, 1.0, True),
    'pretrain.eval_every': (0, None, True),
    'train.epochs': (0, None, True),
    'train.iters': (1, None, True),
    'train.gradient_shares_every': (0, None, True),
    'cluster.kmeans_n_init': (1, None, True),
    'train.lr': (0.0, None, True),
    'train.weight_decay': (0.0, None, True),
    'train.ema_decay': (0.0, 1.0, False),
    'train.erasing_prob': (0.0, 1.0, True),
    'train.eval_every': (0, None, True),
    'train.log_every': (0, None, True),
    'cluster.num_clusters': (0, None, True),  # K-means: >= 2 (checked below); DBSCAN: unused
    'cluster.max_classes': (0, None, True),
    'cluster.k1': (1, None, True),
    'cluster.k2': (1, None, True),
    'cluster.lam': (0.0, 1.0, False),
    'cluster.rho': (0.0, 1.0, False),
    'cluster.min_samples': (1, None, True),
    'data.synthetic.num_train_ids': (2, None, True),
    'data.synthetic.num_test_ids': (2, None, True),
    'data.synthetic.min_images': (2, None, True),
    'data.synthetic.max_images': (2, None, True),
}


def validate_config(config) -> None:
  """Fails before any work starts, naming the offending key."""

  def check(cond, key, msg):
    if not cond:
      raise ConfigError(f'config.{key}: {msg}')

  check(
      config.method in methods_lib.METHODS,
      'method',
      f'{config.method!r} is not one of {sorted(methods_lib.METHODS)}',
  )
  _check_unlabelled_target(config, check)
  for key, (low, high, closed_high) in NUMERIC_RANGES.items():
    node = config
    for part in key.split('.'):
      node = node.get(part) if hasattr(node, 'get') else None
    if node is None:
      continue
    value = node
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value >= low
        and (high is None or (value <= high if closed_high else value < high))
    )
    check(
        ok,
        key,
        f'{value!r} is out of range: must be >= {low}'
        + ('' if high is None else f' and {"<=" if closed_high else "<"} {high}'),
    )
  d = config.data
  check(
      d.batch_size > 0 and d.batch_size % d.num_instances == 0,
      'data.batch_size',
      f'{d.batch_size} must be a positive multiple of data.num_instances={d.num_instances}',
  )
  check(
      d.batch_size % jax.device_count() == 0,
      'data.batch_size',
      f'{d.batch_size} must be divisible by the number of devices ({jax.device_count()})',
  )
  check(d.height > 0 and d.width > 0, 'data.height', 'image size must be positive')
  check(config.model.arch in ('resnet', 'abmt'), 'model.arch', "must be 'resnet' or 'abmt'")
  check(
      config.model.get('backbone', 'resnet') in models.BACKBONES,
      'model.backbone',
      f'{config.model.get("backbone")!r} is not one of {models.BACKBONES}',
  )
  head = config.model.get('head', 'bnneck')
  check(head in models.HEADS, 'model.head', f'{head!r} is not one of {models.HEADS}')
  check(
      head != 'fc_pre_bn' or config.model.get('backbone', 'resnet').startswith('osnet'),
      'model.head',
      "'fc_pre_bn' reads OSNet's fc block; other backbones have 'bnneck' only",
  )
  check(
      config.model.dtype in ('float32', 'bfloat16'),
      'model.dtype',
      "must be 'float32' or 'bfloat16'",
  )
  check(
      config.cluster.method in ('kmeans', 'dbscan'),
      'cluster.method',
      "must be 'kmeans' or 'dbscan'",
  )
  method = methods_lib.METHODS[config.method]
  check(
      method.arch is None or config.model.arch == method.arch,
      'model.arch',
      f'method {config.method!r} needs model.arch={method.arch!r}',
  )
  check(config.pretrain.lr > 0 or not config.pretrain.epochs, 'pretrain.lr', 'must be > 0')
  check(config.train.lr > 0, 'train.lr', 'must be > 0')
  views = tuple(config.train.get('teacher_views') or ())
  if views:
    check(method.ema, 'train.teacher_views', f'method {config.method!r} has no EMA teacher')
    check(
        len(views) == method.num_students,
        'train.teacher_views',
        f'needs one view index per teacher ({method.num_students}), got {views}',
    )
    check(
        all(isinstance(v, int) and 0 <= v <= 3 for v in views),
        'train.teacher_views',
        f'view indices must be integers in 0..3, got {views}',
    )
  export = config.get('export', {}).get('torch_format', '')
  check(
      export in ('', 'torchreid', 'torchvision'),
      'export.torch_format',
      f"{export!r} must be '', 'torchreid' (OSNet) or 'torchvision' (MobileNetV2)",
  )
  check(  # known before training, not after it
      not export or importlib.util.find_spec('torch') is not None,
      'export.torch_format',
      f'writing the {export} file needs PyTorch (pip install torch), or set it to ""',
  )
  methods_lib.from_config(config)  # unknown weight names, a custom loss that does not import


def _check_unlabelled_target(config, check) -> None:
  """An unlabelled folder as target: where it comes from, what it cannot do (select on test,
  serve as a labelled source), and K-means' cluster count, which only the user knows."""
  d, cc = config.data, config.cluster
  if d.target == 'folder':
    check(
        bool(d.get('target_root')),
        'data.target_root',
        'data.target=folder needs the folder of your unlabelled crops: '
        '--config.data.target_root=DIR (one sub-folder per camera)',
    )
    check(
        not (config.train.select_best_on_test and not d.get('val_root')),
        'train.select_best_on_test',
        'an unlabelled target has no test set to select on; set --config.data.val_root=DIR '
        '(a labelled set in Market layout) or leave it False (the last epoch is kept)',
    )
  pretrains = config.method == 'pretrain' or not (
      any(config.init.checkpoints) or config.init.skip_pretrain
  )
  check(
      d.source != 'folder' or not (pretrains or (cc.method == 'dbscan' and cc.lam > 0)),
      'data.source',
      'an unlabelled folder cannot be a source: pre-training and source mixing need identities',
  )
  check(
      not (cc.method == 'kmeans' and cc.num_clusters == 0),
      'cluster.num_clusters',
      'K-means needs the number of clusters for your data: set '
      '--config.cluster.num_clusters=N (about the number of people in the folder), or use a '
      'method that finds it with DBSCAN (configs/folder.py, configs/folder.py:mmt,dbscan)',
  )
  check(
      cc.method != 'kmeans' or cc.num_clusters >= 2,
      'cluster.num_clusters',
      f'{cc.num_clusters} is out of range: K-means needs at least 2 clusters',
  )
