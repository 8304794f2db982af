"""Stage 2: unsupervised adaptation to the target domain (docs/reference.md sections 3 and 4).

Every epoch runs the same named phases, top to bottom in `adapt`:

  extract_features -> make_pseudo_labels -> set_classifiers -> train_epoch -> evaluate -> save

`Adaptation` holds what stays fixed for the run (model, method, jitted epoch, target images);
`LoopState` is the little the loop carries between epochs besides the train state (DBSCAN's eps,
the best and last results), checkpointed with it, so an interrupted run resumes after its last
finished epoch and ends as an uninterrupted one. Every random choice derives from (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Callable
from typing import Sequence

from flax import linen as nn
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from jaxreid import checkpoint as checkpoint_lib
from jaxreid import config_checks
from jaxreid import distributed
from jaxreid import export as export_lib
from jaxreid import features as features_lib
from jaxreid import input_pipeline
from jaxreid import methods as methods_lib
from jaxreid import models
from jaxreid import pseudo_labels
from jaxreid import reporting
from jaxreid import train as train_lib
from jaxreid.evaluator import Evaluator
from jaxreid.input_pipeline import DecodedSet
from jaxreid.metrics_writer import MetricsWriter
from jaxreid.metrics_writer import Progress
from jaxreid.metrics_writer import format_duration
from jaxreid.metrics_writer import log


@dataclasses.dataclass
class LoopState:
  """What the epoch loop carries besides the train state; saved in every checkpoint."""

  epoch: int = 0  # the next epoch to run
  eps: float | None = None  # DBSCAN's radius, estimated at the first epoch (or every epoch)
  best: dict | None = None  # best evaluation so far (only with select_best_on_test)
  last_results: dict = dataclasses.field(default_factory=dict)

  def meta(self, finished_epoch: int) -> dict:
    return {
        'epoch': finished_epoch,
        'eps': self.eps,
        'best': self.best,
        'last_results': self.last_results,
    }

  @classmethod
  def from_meta(cls, meta: dict) -> 'LoopState':
    return cls(meta['epoch'] + 1, meta.get('eps'), meta.get('best'), meta.get('last_results') or {})


@dataclasses.dataclass
class Adaptation:
  """The fixed parts of one adaptation run."""

  config: ml_collections.ConfigDict
  method: methods_lib.Method
  model: nn.Module  # models.ReIDNet or models.ABMTNet, classifier max_classes wide
  tx: optax.GradientTransformation
  train_chunk: Callable  # train.make_train_chunk: (state, data, idx, idx) -> (state, metrics)
  gradient_shares: Callable  # jitted train.make_gradient_shares: (state, data, idx) -> shares
  embed_fn: Callable  # features.make_embed_fn: (variables, images) -> features
  mesh: Mesh
  target: DecodedSet
  evaluator: Evaluator | None  # the target's test split or a validation set; None: no labels
  source: DecodedSet | None  # for DBSCAN's source mixing
  images_dev: jax.Array  # the target training images, on the devices once
  max_classes: int
  writer: MetricsWriter
  ckpt: checkpoint_lib.Checkpointer

  @property
  def two_branch(self) -> bool:
    return self.config.model.arch == 'abmt'


# ----------------------------------------------------------------------------------------------
# Phase 1: features of every network


def network_features(
    embed_fn, state, method, images: np.ndarray, batch_size: int, *, students: bool
) -> dict[str, np.ndarray]:
  """Eval features of every network, keyed 'teacher/netK' and 'student/netK'.

  Teachers always (students instead when the method has no EMA teacher); students too when
  `students` (for the coupling diagnostic). Networks with identical variables (before
  adaptation a teacher is a copy of its student, and MMT's two networks may start from the same
  weights) are extracted once.
  """
  out, done = {}, {}
  for name in method.networks:
    roles = ([True] if method.ema else []) + ([False] if students or not method.ema else [])
    for teacher in roles:
      role = f'{"teacher" if teacher else "student"}/{name}'
      variables = state.variables(name, teacher=teacher)
      key = _fingerprint(variables)
      if key not in done:
        done[key] = features_lib.extract_features(
            embed_fn, [variables], images, batch_size, label=f'[features] {role}'
        )
      out[role] = done[key]
  return out


def _fingerprint(variables) -> str:
  """A digest of every leaf's bytes: equal digests = identical networks."""
  digest = hashlib.sha1()
  for leaf in jax.tree.leaves(jax.device_get(variables)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def clustering_features(role_features: dict, method, cluster_method: str) -> np.ndarray:
  """What the reference clusters: its teachers' features (averaged over MMT's two teachers:
  plainly for K-means, re-normalised for DBSCAN, as its two scripts do), or the student's
  without EMA."""
  kind = 'teacher' if method.ema else 'student'
  return features_lib.average_features(
      [role_features[f'{kind}/{n}'] for n in method.networks],
      renormalize=cluster_method == 'dbscan',
  )


def extract_features(adaptation: Adaptation, state) -> dict[str, np.ndarray]:
  return network_features(
      adaptation.embed_fn,
      state,
      adaptation.method,
      adaptation.target.train,
      adaptation.config.data.eval_batch_size,
      students=bool(adaptation.config.train.coupling),
  )


# ----------------------------------------------------------------------------------------------
# Phase 2: pseudo labels


def make_pseudo_labels(
    adaptation: Adaptation, state, role_feats: dict, loop: LoopState, epoch: int
):
  """Labels of the target training images from the clustering features; returns (labels,
  clustering features, record). Updates `loop.eps`."""
  cc = adaptation.config.cluster
  feats = clustering_features(role_feats, adaptation.method, cc.method)
  source_feats = None
  if cc.method == 'dbscan' and cc.lam > 0:
    if adaptation.source is None:
      raise config_checks.ConfigError(
          'config.cluster.lam > 0 (source mixing) needs a source data set'
      )
    source_roles = network_features(
        adaptation.embed_fn,
        state,
        adaptation.method,
        adaptation.source.train,
        adaptation.config.data.eval_batch_size,
        students=False,
    )
    source_feats = clustering_features(source_roles, adaptation.method, cc.method)
  # Clustered once, by process 0; the other processes receive its labels and eps.
  labels, eps, info = np.zeros(len(feats), np.int64), loop.eps, {}
  if distributed.is_primary():
    labels, eps, info = pseudo_labels.generate(
        cc, feats, source_features=source_feats, seed=adaptation.config.seed + epoch, eps=loop.eps
    )
  labels, eps = distributed.broadcast((labels, np.float64(np.nan if eps is None else eps)))
  labels, loop.eps = np.asarray(labels), None if np.isnan(eps) else float(eps)
  ds = adaptation.target.dataset
  stats = pseudo_labels.cluster_stats(labels, ds.train.pids if ds.labelled else None)
  if stats['num_clusters'] > adaptation.max_classes:
    raise config_checks.ConfigError(
        f'config.cluster.max_classes: {stats["num_clusters"]} clusters exceed config.cluster.max_classes='
        f'{adaptation.max_classes}; raise it (the classifier width is fixed for the run)'
    )
  record = {'epoch': epoch + 1, **info, **{f'cluster/{k}': v for k, v in stats.items()}}
  return labels, feats, record


# ----------------------------------------------------------------------------------------------
# Phase 3: classifiers


def max_classes_for(config, n_train: int) -> int:
  """Fixed classifier width for the run (static shapes: no recompilation as clusters change)."""
  cc = config.cluster
  if cc.max_classes:
    return int(cc.max_classes)
  if cc.method == 'kmeans':
    return int(cc.num_clusters)
  return n_train  # DBSCAN: at most one cluster per image (the reference uses len(train) too)


def resize_classifiers(variables: dict, num_classes: int) -> dict:
  """Re-creates every classifier (param names ending in 'classifier') at a new width, zeroed.

  Adaptation overwrites the rows from cluster centroids every epoch, so the source classifier
  is not carried over (as in the references, whose target classifier has a different width).
  """
  params = dict(variables['params'])
  for key, sub in params.items():
    if key.endswith('classifier'):
      kernel = np.asarray(sub['kernel'])
      params[key] = {**sub, 'kernel': np.zeros((kernel.shape[0], num_classes), kernel.dtype)}
  return {**variables, 'params': params}


def set_classifiers(adaptation: Adaptation, state, feats: np.ndarray, labels: np.ndarray):
  """Classifier rows of every student and teacher := L2-normalised cluster centroids
  (docs/reference.md section 3)."""
  centroids = pseudo_labels.centroids(feats, labels, int(labels.max()) + 1)
  set_rows = jax.jit(models.set_classifier_rows)
  params = {n: set_rows(p, centroids) for n, p in state.params.items()}
  teacher = {n: set_rows(p, centroids) for n, p in state.teacher_params.items()}
  return train_lib.replicate(state.replace(params=params, teacher_params=teacher), adaptation.mesh)


# ----------------------------------------------------------------------------------------------
# Phase 4: one epoch of training


def train_epoch(adaptation: Adaptation, state, labels: np.ndarray, progress: Progress, epoch: int):
  """One epoch on the pseudo labels: P x K batches, a fresh Adam state (the references build a
  new optimizer every epoch), the jitted chunks of `jaxreid.train`."""
  config, tc = adaptation.config, adaptation.config.train
  num_clusters = int(labels.max()) + 1
  data = train_lib.replicate(
      train_lib.EpochData(
          images=adaptation.images_dev,
          labels=labels.astype(np.int32),
          class_mask=models.class_mask(num_clusters, adaptation.max_classes),
          target_images=np.zeros((1,) + adaptation.target.train.shape[1:], np.uint8),
      ),
      adaptation.mesh,
  )
  batch_idx = input_pipeline.pk_epoch_indices(
      np.random.default_rng([config.seed, epoch, 0]),
      labels,
      adaptation.target.dataset.train.camids,
      iters=tc.iters,
      batch_size=config.data.batch_size,
      num_instances=config.data.num_instances,
  )
  state = state.replace(
      opt_state=train_lib.init_opt_state(adaptation.tx, state.params, adaptation.mesh)
  )
  shares = {}
  if tc.gradient_shares_every and epoch % tc.gradient_shares_every == 0:
    t = time.time()
    shares = gradient_shares(adaptation, state, data, batch_idx[0])
    shares['gradient_shares_seconds'] = time.time() - t
  chunk = train_lib.chunk_size(tc.iters, tc.log_every)
  state, metrics, seconds = train_lib.run_epoch(
      adaptation.train_chunk,
      state,
      data,
      batch_idx,
      np.zeros_like(batch_idx),
      progress,
      epoch,
      chunk,
  )
  return state, {**metrics, **shares, 'train_seconds': seconds, 'lr': float(tc.lr)}


def gradient_shares(adaptation: Adaptation, state, data, batch_idx: np.ndarray) -> dict:
  """Each weighted term's share of the gradient on the batch the epoch starts with, as
  `grad_share/<term>` (train.make_gradient_shares); a term under 1% is warned about."""
  idx = distributed.put(batch_idx, train_lib.batch_sharding(adaptation.mesh))
  shares = train_lib.reported_shares(jax.device_get(adaptation.gradient_shares(state, data, idx)))
  for line in train_lib.low_share_warnings(shares):
    log(f'[{adaptation.config.method}] warning: {line}')
  return {f'{GRAD_SHARE}{t}': s for t, s in shares.items()}


GRAD_SHARE = 'grad_share/'


def gradient_shares_on(
    config,
    students: Sequence[dict],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    augment: bool = True,
    mesh: Mesh | None = None,
) -> dict[str, float]:
  """Each weighted term's share of the gradient of `config`'s method and loss on one batch, at
  the start of adaptation (on demand: any model, any labelled or pseudo-labelled batch).

  `students`: each network's variables (one per student network; every teacher a copy);
  `images` (B, H, W, 3) uint8 and `labels` (B,) int: the batch (e.g. P x K with true
  identities). The classifier rows are the L2-normalised class means of the students' eval
  features, as adaptation sets them (docs/reference.md section 3)."""
  mesh = mesh or train_lib.make_mesh()
  method, loss = methods_lib.from_config(config)
  labels = np.asarray(labels, np.int32)
  num_classes = int(labels.max()) + 1
  model = models.create_model(config.model, num_classes=num_classes)
  embed_fn = features_lib.make_embed_fn(model)
  students = [jax.device_get(resize_classifiers(v, num_classes)) for v in students]
  centroids = [
      pseudo_labels.centroids(np.asarray(embed_fn([v], images)), labels, num_classes)
      for v in students
  ]
  # MMT's networks see the mean of both teachers' features at clustering; one batch: their mean
  centroid = sum(centroids) / len(centroids)
  students = [models.set_classifier_rows(v, centroid) for v in students]
  tx = train_lib.make_optimizer(config.train.lr)
  state = train_lib.create_train_state(method, students, tx, jax.random.PRNGKey(config.seed))
  state = train_lib.replicate(state, mesh)
  data = train_lib.replicate(
      train_lib.EpochData(
          images=images,
          labels=labels,
          class_mask=models.class_mask(num_classes, num_classes),
          target_images=np.zeros((1,) + images.shape[1:], np.uint8),
      ),
      mesh,
  )
  fn = train_lib.make_gradient_shares(
      method,
      model,
      loss=loss,
      erasing_prob=config.train.erasing_prob,
      crop_pad=config.data.crop_pad,
      augment=augment,
      mesh=mesh,
  )
  shares = train_lib.jit_gradient_shares(fn, mesh)(state, data, np.arange(len(labels)))
  return train_lib.reported_shares(jax.device_get(shares))


def shares_text(record: dict) -> str:
  """' | grad ce1 38% tri1 12% ...' for the epoch line ('' when not measured this epoch)."""
  items = [(k[len(GRAD_SHARE) :], v) for k, v in record.items() if k.startswith(GRAD_SHARE)]
  return (' | grad ' + ' '.join(f'{t} {v:.0%}' for t, v in items)) if items else ''


# ----------------------------------------------------------------------------------------------
# Phase 5: evaluation


def evaluate(adaptation: Adaptation, state, loop: LoopState, epoch: int) -> dict:
  """Every network's evaluation on the target test set; updates `loop.last_results` (network 1's
  teacher, or the better network with select_best_on_test, the papers' choice) and `loop.best`."""
  tc = adaptation.config.train
  record, per_net = {}, {}
  for name in adaptation.method.networks:
    res = adaptation.evaluator.run(
        adaptation.embed_fn,
        [state.variables(name, teacher=adaptation.method.ema)],
        batch_size=adaptation.config.data.eval_batch_size,
        branches=adaptation.two_branch,
    )
    per_net[name] = res
    record.update({f'{name}/{k}': v for k, v in res.items()})
  names = adaptation.method.networks
  model_name = max(per_net, key=lambda n: per_net[n]['mAP']) if tc.select_best_on_test else names[0]
  loop.last_results = dict(per_net[model_name], model=model_name, epoch=epoch + 1)
  record.update(
      {k: v for k, v in loop.last_results.items() if k in ('mAP', 'top1', 'top5', 'top10')}
  )
  if tc.select_best_on_test and (loop.best is None or loop.last_results['mAP'] > loop.best['mAP']):
    loop.best = loop.last_results
    adaptation.ckpt.save(epoch, state, loop.meta(epoch), kind='best')
  return record


# ----------------------------------------------------------------------------------------------
# The loop


def setup(
    config, target, source, students: Sequence[dict], workdir: str, mesh, writer, evaluator=None
):
  """The run's fixed parts and its starting train state (fresh or restored) and loop state."""
  tc = config.train
  method, loss = methods_lib.from_config(config)
  max_classes = max_classes_for(config, len(target.dataset.train.pids))
  model = models.create_model(config.model, num_classes=max_classes)
  students = [resize_classifiers(v, max_classes) for v in students]
  tx = train_lib.make_optimizer(tc.lr, weight_decay=tc.weight_decay)
  state = train_lib.create_train_state(method, students, tx, jax.random.PRNGKey(config.seed))
  state = train_lib.replicate(state, mesh)
  step_fn = train_lib.make_train_step(
      method,
      model,
      tx,
      loss=loss,
      ema_decay=tc.ema_decay,
      erasing_prob=tc.erasing_prob,
      crop_pad=config.data.crop_pad,
      mesh=mesh,
  )
  adaptation = Adaptation(
      config=config,
      method=method,
      model=model,
      tx=tx,
      train_chunk=train_lib.make_train_chunk(step_fn, mesh),
      gradient_shares=train_lib.jit_gradient_shares(
          train_lib.make_gradient_shares(
              method,
              model,
              loss=loss,
              erasing_prob=tc.erasing_prob,
              crop_pad=config.data.crop_pad,
              mesh=mesh,
          ),
          mesh,
      ),
      embed_fn=features_lib.make_embed_fn(model, mesh),
      mesh=mesh,
      target=target,
      evaluator=evaluator,
      source=source,
      images_dev=train_lib.replicate(target.train, mesh),
      max_classes=max_classes,
      writer=writer,
      ckpt=checkpoint_lib.Checkpointer(workdir),
  )
  loop = LoopState()
  if adaptation.ckpt.latest_step() is not None:
    state, meta = adaptation.ckpt.restore(state)
    loop = LoopState.from_meta(meta)
    log(f'[{config.method}] resuming after epoch {loop.epoch} from {adaptation.ckpt.directory}')
  return adaptation, state, loop


def adapt(
    config,
    target,
    source,
    students: Sequence[dict],
    workdir: str,
    mesh,
    writer: MetricsWriter,
    evaluator: Evaluator | None = None,
) -> dict:
  """Unsupervised adaptation to the target domain; returns the selected model's evaluation by
  `evaluator` (the target's test split or a validation set; None: an unlabelled target, an empty
  result)."""
  adaptation, state, loop = setup(
      config, target, source, students, workdir, mesh, writer, evaluator
  )
  tc = config.train
  progress = Progress(config.method, tc.epochs, tc.iters, loop.epoch)
  # Features of the current state, when the previous epoch already extracted them for the
  # coupling diagnostic (the same state gives the same features, so resuming is unaffected).
  current_features = None
  for epoch in range(loop.epoch, tc.epochs):
    t_epoch = time.time()
    role_feats = current_features or extract_features(adaptation, state)
    current_features = None
    features_seconds = time.time() - t_epoch
    if epoch == 0 and tc.coupling:  # the networks before adaptation
      writer.write(
          config.method, 0, features_lib.coupling(role_feats, two_branch=adaptation.two_branch)
      )

    labels, feats, record = make_pseudo_labels(adaptation, state, role_feats, loop, epoch)
    num_clusters = int(record['cluster/num_clusters'])
    if num_clusters < 2:
      log(
          f'[{config.method}] epoch {epoch + 1}: clustering gave {num_clusters} cluster(s) '
          f'(noise {record["cluster/noise_fraction"]:.0%}); skipping training this epoch. If '
          'this persists, check the features or the clustering settings (eps / rho, '
          'num_clusters).'
      )
      writer.write(config.method, epoch + 1, {**record, 'skipped': True})
      adaptation.ckpt.save(epoch, state, loop.meta(epoch))
      continue

    state = set_classifiers(adaptation, state, feats, labels)
    state, metrics = train_epoch(adaptation, state, labels, progress, epoch)
    progress.epoch_done(time.time() - t_epoch)
    record.update(metrics)
    if tc.coupling:  # the networks after this epoch (ABMT paper, Fig. 4)
      t = time.time()
      current_features = extract_features(adaptation, state)
      record.update(features_lib.coupling(current_features, two_branch=adaptation.two_branch))
      features_seconds += time.time() - t

    eval_now = (
        adaptation.evaluator is not None
        and tc.eval_every
        and ((epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs)
    )
    if eval_now:
      t = time.time()
      record.update(evaluate(adaptation, state, loop, epoch))
      record['evaluate_seconds'] = time.time() - t
    record.update(features_seconds=features_seconds, epoch_seconds=time.time() - t_epoch)

    writer.write(config.method, epoch + 1, record)
    adaptation.ckpt.save(epoch, state, loop.meta(epoch))
    if eval_now:
      reporting.draw_plots(workdir, overview_only=True)
    log(
        f'[{config.method}] epoch {epoch + 1}/{tc.epochs} loss {metrics["loss/total"]:.3f} '
        f'clusters {num_clusters} noise {record["cluster/noise_fraction"]:.0%}'
        + (
            f' purity {record["cluster/purity"]:.2f} nmi {record["cluster/nmi"]:.2f}'
            if 'cluster/nmi' in record
            else unsupervised_signals(record)
        )
        + (f' | {reporting.results_line(loop.last_results)}' if eval_now else '')
        + shares_text(record)
        + f' | {time.time() - t_epoch:.1f}s eta {format_duration(progress.eta(epoch))}'
    )
  return finish(adaptation, state, loop, workdir)


def unsupervised_signals(record: dict) -> str:
  """What tells an unlabelled run's progress: cluster sizes (median / largest) and how far each
  teacher has moved from its student (the coupling diagnostic)."""
  text = (
      f' sizes median {record["cluster/median_cluster"]:.0f} max '
      f'{record["cluster/largest_cluster"]}'
  )
  if 'coupling/teacher_student' in record:
    text += f' teacher-student {record["coupling/teacher_student"]:.3f}'
  return text


def finish(adaptation: Adaptation, state, loop: LoopState, workdir: str) -> dict:
  """Exports the reported model: the best epoch's (and its network) with select_best_on_test,
  else the last epoch's (as model.msgpack, and as a PyTorch file with export.torch_format);
  returns its evaluation."""
  if adaptation.config.train.select_best_on_test and loop.best is not None:
    selected = dict(loop.best, selection='best epoch on the target test set')
    export_state, _ = adaptation.ckpt.restore(state, kind='best')
  else:
    selected, export_state = dict(loop.last_results, selection='last epoch'), state
  path = os.path.join(workdir, 'model.msgpack')
  network = selected.get('model', adaptation.method.networks[0])
  variables = export_state.variables(network, teacher=adaptation.method.ema)
  checkpoint_lib.save_weights(path, variables)
  log(f'[export] model written to {path}')
  fmt = adaptation.config.export.torch_format
  if fmt and distributed.is_primary():
    torch_path = os.path.join(workdir, 'model.pth')
    _, notes = export_lib.write_torch_file(
        adaptation.model, jax.device_get(variables), fmt, torch_path
    )
    log(f'[export] {fmt} file written to {torch_path}: ' + '; '.join(notes))
  adaptation.ckpt.close()
  return selected
