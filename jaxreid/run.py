"""The whole experiment: source models (given or pre-trained), then adaptation, then results.

`train_and_evaluate(config, workdir)` is what `python -m jaxreid.main` runs: it decodes the data
sets once, gets the starting networks (`config.init` weights, `jaxreid.pretrain`), evaluates
them on the target (the "source only" row), adapts (`jaxreid.adapt`) and writes results.json.
Every random choice is derived from `(seed, epoch)`, so a run interrupted at any point and
restarted with the same command resumes from its last checkpoint and ends with the same result
as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from flax import traverse_util
import jax
import ml_collections
import numpy as np

from jaxreid import adapt as adapt_lib
from jaxreid import checkpoint as checkpoint_lib
from jaxreid import config_checks
from jaxreid import distributed
from jaxreid import features as features_lib
from jaxreid import input_pipeline
from jaxreid import methods as methods_lib
from jaxreid import models
from jaxreid import pretrain as pretrain_lib
from jaxreid import reporting
from jaxreid import train as train_lib
from jaxreid import workdir as workdir_lib
from jaxreid.evaluator import Evaluator
from jaxreid.metrics_writer import MetricsWriter
from jaxreid.metrics_writer import log


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_safe_changes: bool = False
) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the results table's rows.

  One process per work dir (a lock file; with several processes, `jaxreid.distributed`, process 0
  holds it and writes the files); a rerun must use the config the work dir was started with
  (`jaxreid.workdir.remember_config`); a finished run is not redone: its results are read back
  and printed."""
  config_checks.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  primary = distributed.is_primary()
  with workdir_lib.Lock(workdir) if primary else contextlib.nullcontext():
    results_path = os.path.join(workdir, 'results.json')
    config_path = os.path.join(workdir, 'config.json')
    current = json.loads(config.to_json_best_effort())
    unchanged = os.path.exists(config_path) and workdir_lib.read_config(config_path) == current
    if primary:
      workdir_lib.remember_config(config, workdir, allow_safe_changes=allow_safe_changes)
    if unchanged and os.path.exists(results_path):
      with open(results_path) as f:
        summary = json.load(f)
      log(
          f'[done] {workdir} holds a finished run of this config (use a new --workdir to run it '
          'again); its results:'
      )
      reporting.print_summary(config, summary)
      return summary
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  started = time.time()
  log('[config] ' + ' '.join(f'{k}={v}' for k, v in sorted(_flat_config(config).items())))
  mesh = train_lib.make_mesh()
  log(
      f'[setup] {jax.device_count()} device(s): {jax.devices()[0].device_kind}; '
      f'work dir {os.path.abspath(workdir)}'
  )
  h, w = config.data.height, config.data.width
  pretrains = config.method == 'pretrain' or not (
      any(config.init.checkpoints) or config.init.skip_pretrain
  )
  needs_source = pretrains or (config.cluster.method == 'dbscan' and config.cluster.lam > 0)
  world = config.data.synthetic.to_dict()
  target = input_pipeline.load_and_decode(
      config.data.target, input_pipeline.dataset_root(config, 'target'), h, w, synthetic=world
  )
  source = (
      input_pipeline.load_and_decode(
          config.data.source, input_pipeline.dataset_root(config, 'source'), h, w, synthetic=world
      )
      if needs_source
      else None
  )
  test = test_evaluator(config, target)
  decoded = time.time()
  writer = MetricsWriter(workdir)
  initial, fresh_extra_block = load_initial(config)
  if config.method == 'pretrain':
    variables = pretrain_lib.pretrain(
        config,
        source,
        target,
        pretrain_seed(config),
        os.path.join(workdir, f'pretrain_seed{pretrain_seed(config)}'),
        mesh,
        initial=initial,
    )
    model = models.create_model(config.model, num_classes=source.dataset.num_train_pids)
    embed_fn = features_lib.make_embed_fn(model, mesh)
    batch = config.data.eval_batch_size
    results = {'source': Evaluator.of_decoded(source).run(embed_fn, [variables], batch_size=batch)}
    if test is not None:
      results['target'] = test.run(embed_fn, [variables], batch_size=batch)
    writer.write(
        'pretrain_final', 0, {f'{k}/{m}': v for k, r in results.items() for m, v in r.items()}
    )
    summary = {
        'source domain (supervised)': results['source'],
        'target domain (source only)': results.get('target', {}),
    }
    reporting.print_summary(config, summary)
    _write_results(workdir, summary)
    return results
  students = source_models(config, source, target, workdir, mesh, initial, fresh_extra_block)
  have_models = time.time()
  method = methods_lib.get(config.method)
  model = models.create_model(
      config.model,
      num_classes=students[0]['params'][_classifier_key(students[0])]['kernel'].shape[1],
  )
  embed_fn = features_lib.make_embed_fn(model, mesh)
  source_only = {}
  if test is not None:
    source_only = test.run(
        embed_fn,
        [students[0]],
        batch_size=config.data.eval_batch_size,
        branches=config.model.arch == 'abmt',
    )
    writer.write('source_only', 0, source_only)
  # Where the time goes (experiments/phase_breakdown.py adds the adaptation epochs' phases).
  writer.write(
      'timing',
      0,
      {
          'started': started,
          'decode_seconds': decoded - started,
          'source_models_seconds': have_models - decoded,
          'source_only_seconds': time.time() - have_models,
      },
  )
  if test is not None:
    log(f'[source only] {test.name} {reporting.results_line(source_only)}')
  else:
    log(
        '[source only] not evaluated: the target has no labels (no query / gallery) and no '
        'config.data.val_root was given; the unsupervised signals are logged each epoch'
    )
  adapted = adapt_lib.adapt(
      config, target, source, students[: method.num_students], workdir, mesh, writer, test
  )
  writer.close()
  summary = {'source only': source_only, f'{config.method} (adapted)': adapted}
  reporting.print_summary(config, summary)
  reporting.draw_plots(workdir)
  _write_results(workdir, summary)
  return summary


def test_evaluator(config, target: input_pipeline.DecodedSet) -> Evaluator | None:
  """What the run is scored on: the target's own query / gallery, else the labelled validation
  set `config.data.val_root` (its query/ and bounding_box_test/ in Market layout), else nothing
  (an unlabelled target). Re-ranked when `config.eval.rerank`."""
  rerank = bool(config.eval.rerank)
  if target.dataset.has_test_split:
    return Evaluator.of_decoded(target, rerank=rerank)
  if not config.data.get('val_root'):
    return None
  h, w = config.data.height, config.data.width
  val = input_pipeline.load_and_decode('market1501_test', config.data.val_root, h, w)
  return Evaluator.of_decoded(val, rerank=rerank)


def _write_results(workdir: str, summary: dict) -> None:
  if distributed.is_primary():
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(summary, f, indent=2, default=float)


def _flat_config(config) -> dict:
  return workdir_lib._flatten(json.loads(config.to_json_best_effort()))  # pylint: disable=protected-access


def _classifier_key(variables) -> str:
  return next(k for k in variables['params'] if k.endswith('classifier'))


def load_initial(config) -> tuple[dict | None, bool]:
  """The weights to start from (`config.init.pretrained`), if configured: a `.msgpack` of the
  project's format or a PyTorch file (torchvision, IBN-Net, torchreid, MMT, ABMT), converted
  here without executing anything from it. Classifiers are dropped (they are re-created for the
  source identities or the clusters). Also returns whether ABMT's extra block was freshly
  initialised (a single-branch checkpoint: see `warm_start_max_branch`)."""
  path = config.init.pretrained
  if not path:
    return None, False
  model = models.create_model(config.model, num_classes=1)
  report = {}
  variables = checkpoint_lib.load_weights(
      path, model, key='config.init.pretrained', drop_classifier=True, report=report
  )
  return variables, any('max_branch/extra' in p for p in report.get('fresh', ()))


def warm_start_max_branch(
    model, variables: dict, images: np.ndarray, seed: int, batches: int = 50, batch: int = 32
) -> dict:
  """ABMT from a single-branch re-ID model without source training (docs/reference.md section 9).

  The reference trains the max branch's random extra block during source pre-training; started
  from a downloaded model it would be untrained, and its random residual plus max pooling make
  the joint feature useless (far below the avg branch alone, and DBSCAN then merges most images
  into one cluster; docs/reference.md section 9). So the extra block starts as an identity
  (its last BN's scale and bias 0; it still learns) and the max branch's BatchNorm statistics (its copied
  last stage after max pooling, and its neck) are re-estimated on target images in train mode, no
  gradient (OSNet's BN neck behind the fc keeps the identity statistics the avg branch starts
  with); the shared trunk and the avg branch are untouched, so the avg branch is exactly the
  given model."""
  flat = traverse_util.flatten_dict(variables)
  last_bn = {'resnet': 'bn3', 'mobilenetv2': 'project'}.get(model.backbone, 'conv3')
  for path in flat:
    if path[:4] == ('params', 'max_branch', 'extra', last_bn) and path[-1] in ('scale', 'bias'):
      flat[path] = np.zeros_like(flat[path])
  variables = traverse_util.unflatten_dict(flat)

  @jax.jit
  def update(v, x):
    _, new = model.apply(v, input_pipeline.normalize(x), train=True, mutable=['batch_stats'])
    stats = dict(v['batch_stats'])
    for key in ('max_branch', 'max_neck'):
      stats[key] = new['batch_stats'][key]
    if 'bn' in stats['max_neck']:  # OSNet's BN neck stays as the avg branch's (identity)
      stats['max_neck'] = {**stats['max_neck'], 'bn': v['batch_stats']['max_neck']['bn']}
    return {**v, 'batch_stats': stats}

  rng = np.random.default_rng([seed, 12345])
  for _ in range(batches):  # momentum 0.1 per batch: the old statistics weigh 0.9^50 < 1%
    variables = update(variables, images[rng.choice(len(images), batch, replace=False)])
  log(
      f'[init] ABMT max branch: extra block as identity, BatchNorm statistics re-estimated on '
      f'{batches} x {batch} target images'
  )
  return jax.device_get(variables)


def pretrain_seed(config) -> int:
  """The source pre-training's seed: `config.pretrain.seed`, or the run's seed when unset."""
  return config.seed if config.pretrain.get('seed') is None else config.pretrain.seed


def source_models(
    config, source, target, workdir, mesh, initial, fresh_extra_block=False
) -> list[dict]:
  """The starting networks: given checkpoints, or pre-trained here (one per MMT network)."""
  num = methods_lib.get(config.method).num_students
  paths = [p for p in config.init.checkpoints if p]
  if paths:
    model = models.create_model(config.model, num_classes=1)
    return [
        checkpoint_lib.load_weights(p, model, key='config.init.checkpoints', drop_classifier=True)
        for p in (paths * num)[:num]
    ]
  if config.init.get('skip_pretrain', False):
    if initial is None:
      raise config_checks.ConfigError(
          'config.init.skip_pretrain needs config.init.pretrained weights'
      )
    if fresh_extra_block:
      model = models.create_model(config.model, num_classes=1)
      initial = warm_start_max_branch(model, initial, target.train, config.seed)
    return [initial] * num
  # MMT pre-trains one model per network with different seeds (docs/reference.md section 3).
  seeds = [pretrain_seed(config) + k for k in range(num)]
  return [
      pretrain_lib.pretrain(
          config,
          source,
          target,
          s,
          os.path.join(workdir, f'pretrain_seed{s}'),
          mesh,
          initial=initial,
      )
      for s in seeds
  ]
