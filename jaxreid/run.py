"""The experiment: source pre-training, then cluster -> set classifiers -> train -> evaluate.

`train_and_evaluate(config, workdir)` is what `python -m jaxreid.main` runs. Host-side work
(decoding, clustering, the sampler) happens between jitted epochs; everything inside an epoch is on
the device (`jaxreid.train`). Every random choice is derived from `(seed, epoch)`, so a run
interrupted at any point and restarted with the same command resumes from its last checkpoint and
ends with the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any
from typing import Sequence

import jax
import ml_collections
import numpy as np

from jaxreid import checkpoint as checkpoint_lib
from jaxreid import clustering
from jaxreid import features as features_lib
from jaxreid import input_pipeline
from jaxreid import models
from jaxreid import objectives
from jaxreid import retrieval
from jaxreid import train as train_lib
from jaxreid import workdir as workdir_lib
from jaxreid.data import ReidDataset
from jaxreid.data import load_dataset
from jaxreid.metrics_writer import MetricsWriter
from jaxreid.metrics_writer import Progress
from jaxreid.metrics_writer import format_duration
from jaxreid.metrics_writer import log


class NonFiniteLossError(RuntimeError):
  pass


# ----------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class DecodedSet:
  """A data set with every split decoded once into uint8 arrays (docs/reference.md section 3)."""

  dataset: ReidDataset
  train: np.ndarray
  query: np.ndarray
  gallery: np.ndarray

  @functools.cached_property
  def test_images(self) -> np.ndarray:
    """Query then gallery images, concatenated once (evaluations reuse it)."""
    return np.concatenate([self.query, self.gallery])


def load_and_decode(
    name: str, root: str | None, height: int, width: int, *, synthetic: dict | None = None
) -> DecodedSet:
  kwargs = dict(synthetic or {}) if name.startswith('synthetic') else {}
  dataset = load_dataset(name, root or None, **kwargs)
  log(
      f'[data] {name}: {len(dataset.train.pids)} train images of {dataset.num_train_pids} ids, '
      f'{len(dataset.query.pids)} queries, {len(dataset.gallery.pids)} gallery ({dataset.root})'
  )
  decode = lambda split: input_pipeline.decode_images(split.paths, height, width)
  return DecodedSet(dataset, decode(dataset.train), decode(dataset.query), decode(dataset.gallery))


def dataset_root(config, which: str) -> str | None:
  root = config.data.get(f'{which}_root', '')
  name = config.data[which]
  if root:
    return root
  if config.data.get('root', '') and not name.startswith('synthetic'):
    return os.path.join(config.data.root, name)
  return None


# ----------------------------------------------------------------------------------------------
# Models and evaluation


def build_model(config, num_classes: int):
  return models.create_model({**config.model.to_dict(), 'num_classes': int(num_classes)})


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


def evaluate_variables(
    embed_fn,
    variable_sets: Sequence[dict],
    target: DecodedSet,
    *,
    batch_size: int,
    rerank: bool = False,
    branches: bool = False,
) -> dict:
  """Market-protocol results of the eval features on `target`'s query / gallery.

  `branches` (ABMTNet): also each branch alone, from the halves of the same features
  (`features.branch_features`), as 'avg/mAP', 'avg/top1', 'max/mAP', 'max/top1'.
  """
  ds = target.dataset
  feats = features_lib.extract_features(
      embed_fn, variable_sets, target.test_images, batch_size, label='[evaluate] query + gallery'
  )
  nq = len(target.query)
  ids = (ds.query.pids, ds.gallery.pids, ds.query.camids, ds.gallery.camids)
  results = retrieval.evaluate(feats[:nq], feats[nq:], *ids, rerank=rerank)
  if branches:
    for name, half in zip(('avg', 'max'), features_lib.branch_features(feats)):
      res = retrieval.evaluate(half[:nq], half[nq:], *ids, rerank=rerank)
      results.update({f'{name}/mAP': res['mAP'], f'{name}/top1': res['top1']})
  return results


def results_line(results: dict) -> str:
  line = (
      f"mAP {results['mAP']:.1f} top1 {results['top1']:.1f} top5 {results['top5']:.1f} "
      f"top10 {results['top10']:.1f}"
  )
  if 'avg/mAP' in results:  # ABMTNet: each branch alone
    line += f" (branch mAP avg {results['avg/mAP']:.1f} max {results['max/mAP']:.1f})"
  return line


# ----------------------------------------------------------------------------------------------
# Epoch driver shared by pre-training and adaptation


def _chunk_size(iters: int, log_every: int) -> int:
  """The largest divisor of `iters` not above `log_every`: one compiled chunk shape per run."""
  log_every = max(1, min(log_every or iters, iters))
  for size in range(log_every, 0, -1):
    if iters % size == 0:
      return size
  return iters


def run_epoch(
    train_chunk,
    state,
    data,
    batch_idx: np.ndarray,
    target_idx: np.ndarray,
    progress: Progress,
    epoch: int,
    chunk: int,
):
  """Runs one epoch chunk by chunk; fetches metrics only at chunk ends (logging)."""
  iters = len(batch_idx)
  t0 = time.time()
  metrics_chunks = []
  for start in range(0, iters, chunk):
    state, metrics = train_chunk(
        state, data, batch_idx[start : start + chunk], target_idx[start : start + chunk]
    )
    metrics = jax.device_get(metrics)
    metrics_chunks.append(metrics)
    total = float(np.mean(metrics['loss/total']))
    bad = [
        what
        for what, ok in (
            ('loss', np.all(np.isfinite(metrics['loss/total']))),
            ('gradient norm', np.all(np.isfinite(metrics['grad_norm']))),
            ('parameters', np.all(metrics.get('finite', 1.0) == 1.0)),
        )
        if not ok
    ]
    if bad:
      raise NonFiniteLossError(
          f'non-finite {" and ".join(bad)} at epoch {epoch + 1}, iteration {start + chunk} '
          f'(loss {total:.4g}, gradient norm {float(np.max(metrics["grad_norm"])):.4g}). '
          'Nothing of this epoch was saved; the last good checkpoint is kept. Lower the learning '
          'rate or check the inputs, then rerun the same command.'
      )
    if iters // chunk > 1:
      log(progress.line(epoch, start + chunk, time.time() - t0, f'loss {total:.3f}'))
  merged = {
      k: float(np.mean(np.concatenate([np.atleast_1d(m[k]) for m in metrics_chunks])))
      for k in metrics_chunks[0]
  }
  return state, merged, time.time() - t0


# ----------------------------------------------------------------------------------------------
# Stage 1: supervised source pre-training


def pretrain_terms(arch: str) -> tuple:
  """CE + softmax-triplet on source labels; ABMT averages each over its two branches (as
  ABMT's pre-trainer does)."""
  if arch != 'abmt':
    return objectives.build_objective('pretrain')
  Term = objectives.Term
  terms = []
  for branch in ('avg', 'max'):
    terms.append(
        Term(
            f'ce_{branch}',
            'cross_entropy_label_smooth',
            0.5,
            {'logits': f'student1/{branch}/logits', 'labels': 'labels', 'class_mask': 'class_mask'},
        )
    )
    terms.append(
        Term(
            f'tri_{branch}',
            'softmax_triplet',
            0.5,
            {'features': f'student1/{branch}/features', 'labels': 'labels'},
        )
    )
  return tuple(terms)


def pretrain(
    config,
    source: DecodedSet,
    target: DecodedSet | None,
    seed: int,
    workdir: str,
    mesh,
    *,
    initial: dict | None = None,
) -> dict:
  """Trains one source model (docs/reference.md section 3, stage 1); resumable; returns its variables."""
  pc = config.pretrain
  ds = source.dataset
  num_classes = ds.num_train_pids
  model = build_model(config, num_classes)
  spec = train_lib.METHODS['pretrain']
  rng = jax.random.PRNGKey(seed)
  fresh = models.init_variables(model, seed)
  variables = fresh
  if initial is not None:  # pretrained trunk, fresh N(0, 0.001) classifier for the source ids
    variables = {
        **initial,
        'params': {
            **initial['params'],
            **{k: v for k, v in fresh['params'].items() if k.endswith('classifier')},
        },
    }
  schedule = train_lib.warmup_multistep_schedule(
      pc.lr, pc.iters, warmup_epochs=pc.warmup_epochs, milestones=tuple(pc.milestones)
  )
  tx = train_lib.make_optimizer(schedule, weight_decay=config.train.weight_decay)
  state = train_lib.create_train_state(spec, [variables], tx, jax.random.fold_in(rng, 1))
  state = train_lib.replicate(state, mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir)
  writer = MetricsWriter(workdir)
  start_epoch = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    start_epoch = meta['epoch'] + 1
    log(f'[pretrain seed {seed}] resuming after epoch {start_epoch} from {ckpt.directory}')
  terms = pretrain_terms(config.model.arch)
  use_target = target is not None and pc.target_bn
  step_fn = train_lib.make_train_step(
      model, spec, terms, tx, erasing_prob=pc.erasing_prob, target_bn_pass=use_target, mesh=mesh
  )
  train_chunk = train_lib.make_train_chunk(step_fn, mesh)
  empty = np.zeros((1,) + source.train.shape[1:], np.uint8)
  data = train_lib.EpochData(
      images=source.train,
      labels=ds.train.pids.astype(np.int32),
      class_mask=np.ones((num_classes,), bool),
      target_images=target.train if use_target else empty,
  )
  data = train_lib.replicate(data, mesh)
  batch = config.data.batch_size
  chunk = _chunk_size(pc.iters, config.train.log_every)
  progress = Progress(f'pretrain seed {seed}', pc.epochs, pc.iters, start_epoch)
  embed_fn = features_lib.make_embed_fn(model, mesh)
  for epoch in range(start_epoch, pc.epochs):
    sampler_rng = np.random.default_rng([seed, epoch, 0])
    batch_idx = input_pipeline.pk_epoch_indices(
        sampler_rng,
        ds.train.pids,
        ds.train.camids,
        iters=pc.iters,
        batch_size=batch,
        num_instances=config.data.num_instances,
    )
    n_target = len(target.train) if use_target else 1
    target_idx = _random_batches(np.random.default_rng([seed, epoch, 1]), n_target, pc.iters, batch)
    state, metrics, seconds = run_epoch(
        train_chunk, state, data, batch_idx, target_idx, progress, epoch, chunk
    )
    progress.epoch_done(seconds)
    record = {
        'epoch': epoch + 1,
        'lr': float(schedule(epoch * pc.iters)),
        'epoch_seconds': seconds,
        **metrics,
    }
    eval_now = pc.eval_every and ((epoch + 1) % pc.eval_every == 0 or epoch + 1 == pc.epochs)
    if eval_now and source.query is not None:
      res = evaluate_variables(
          embed_fn, [state.variables('net1')], source, batch_size=config.data.eval_batch_size
      )
      record.update({f'source_{k}': v for k, v in res.items()})
    writer.write('pretrain', epoch + 1, record)
    eta = progress.eta(epoch)
    log(
        f'[pretrain seed {seed}] epoch {epoch + 1}/{pc.epochs} loss {metrics["loss/total"]:.3f} '
        f'lr {record["lr"]:.2e} {seconds:.1f}s eta {format_duration(eta)}'
        + (
            f' | source {results_line({k[7:]: v for k, v in record.items() if k.startswith("source_")})}'
            if 'source_mAP' in record
            else ''
        )
    )
    ckpt.save(epoch, state, {'epoch': epoch, 'stage': 'pretrain', 'seed': seed})
  ckpt.close()
  writer.close()
  variables = jax.device_get(state.variables('net1'))
  # The source model in the project's weight format, reusable via config.init.checkpoints.
  export_model(os.path.join(workdir, 'model.msgpack'), variables)
  return variables


def _random_batches(rng: np.random.Generator, n: int, iters: int, batch: int) -> np.ndarray:
  """Shuffled passes over n items cut into (iters, batch) (the reference's plain loader)."""
  needed = iters * batch
  order = np.concatenate([rng.permutation(n) for _ in range(-(-needed // n))])[:needed]
  return order.reshape(iters, batch).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Stage 2: adaptation (clustering baseline, mean teacher, MMT, ABMT)


def network_features(
    embed_fn, state, spec, images: np.ndarray, batch_size: int, *, students: bool
) -> dict[str, np.ndarray]:
  """Eval features of every network, keyed 'teacher/netK' and 'student/netK'.

  Teachers always (students instead when the method has no EMA teacher); students too when
  `students` (for the coupling diagnostic). Networks with identical variables (before
  adaptation a teacher is a copy of its student, and MMT's two networks may start from the same
  weights) are extracted once.
  """
  out, done = {}, {}
  for name in train_lib.net_names(spec):
    roles = ([True] if spec.ema else []) + ([False] if students or not spec.ema else [])
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


def clustering_features(role_features: dict, spec, cluster_method: str) -> np.ndarray:
  """What the reference clusters: its teachers' features (averaged over MMT's two teachers:
  plainly for K-means, re-normalised for DBSCAN, as its two scripts do), or the student's
  without EMA."""
  kind = 'teacher' if spec.ema else 'student'
  return features_lib.average_features(
      [role_features[f'{kind}/{n}'] for n in train_lib.net_names(spec)],
      renormalize=cluster_method == 'dbscan',
  )


def make_pseudo_labels(
    config,
    feats: np.ndarray,
    source_feats: np.ndarray | None,
    epoch: int,
    eps: float | None,
    seed: int,
):
  """Clusters target features (docs/reference.md sections 3 and 4); returns labels, eps, info."""
  cc = config.cluster
  t0 = time.time()
  info: dict[str, Any] = {}
  what = (
      f'K-means, {cc.num_clusters} clusters'
      if cc.method == 'kmeans'
      else f'k-reciprocal Jaccard (k1 {cc.k1}, k2 {cc.k2}) + DBSCAN'
  )
  log(f'[cluster] {what} of {feats.shape[0]} x {feats.shape[1]} features ...')
  if cc.method == 'kmeans':
    labels, _ = clustering.kmeans(
        feats, cc.num_clusters, seed=seed + epoch, backend=cc.kmeans_backend
    )
  elif cc.method == 'dbscan':
    graph = retrieval.jaccard_distance(
        feats, k1=cc.k1, k2=cc.k2, source_features=source_feats if cc.lam > 0 else None, lam=cc.lam
    )
    if eps is None or cc.eps_every_epoch:
      eps = float(clustering.estimate_eps(graph, cc.rho))
    labels = clustering.dbscan(graph, eps, min_samples=cc.min_samples)
    info['eps'] = eps
  else:
    raise ValueError(f"config.cluster.method must be 'kmeans' or 'dbscan', got {cc.method!r}")
  labels = clustering.relabel_contiguous(np.asarray(labels))
  info['cluster_seconds'] = time.time() - t0
  log(f'[cluster] done in {format_duration(info["cluster_seconds"])}')
  return labels, eps, info


def adapt(
    config,
    target: DecodedSet,
    source: DecodedSet | None,
    students: Sequence[dict],
    workdir: str,
    mesh,
    writer: MetricsWriter,
) -> dict:
  """Unsupervised adaptation to the target domain; returns the final evaluation."""
  tc, cc = config.train, config.cluster
  spec = method_spec(config)
  ds = target.dataset
  n_train = len(ds.train.pids)
  max_classes = max_classes_for(config, n_train)
  model = build_model(config, max_classes)
  seed = config.seed
  students = [resize_classifiers(v, max_classes) for v in students]
  tx = train_lib.make_optimizer(tc.lr, weight_decay=tc.weight_decay)
  state = train_lib.create_train_state(spec, students, tx, jax.random.PRNGKey(seed))
  state = train_lib.replicate(state, mesh)
  terms = loss_terms(config)
  step_fn = train_lib.make_train_step(
      model, spec, terms, tx, ema_decay=tc.ema_decay, erasing_prob=tc.erasing_prob, mesh=mesh
  )
  train_chunk = train_lib.make_train_chunk(step_fn, mesh)
  embed_fn = features_lib.make_embed_fn(model, mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir)
  start_epoch, eps, best, last_results = 0, None, None, {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    start_epoch, eps, best = meta['epoch'] + 1, meta.get('eps'), meta.get('best')
    last_results = meta.get('last_results') or {}
    log(f'[{config.method}] resuming after epoch {start_epoch} from {ckpt.directory}')
  names = train_lib.net_names(spec)
  eval_roles = [(n, spec.ema) for n in names]
  batch, chunk = config.data.batch_size, _chunk_size(tc.iters, tc.log_every)
  progress = Progress(config.method, tc.epochs, tc.iters, start_epoch)
  empty = np.zeros((1,) + target.train.shape[1:], np.uint8)
  images_dev = train_lib.replicate(target.train, mesh)
  source_feats = None
  two_branch = config.model.arch == 'abmt'
  with_coupling = bool(tc.coupling)
  extract = functools.partial(
      network_features,
      embed_fn,
      images=target.train,
      batch_size=config.data.eval_batch_size,
      students=with_coupling,
  )
  # Features of the current state, when the previous epoch already extracted them for the
  # coupling diagnostic (the same state gives the same features, so resuming is unaffected).
  current_features = None
  for epoch in range(start_epoch, tc.epochs):
    t_epoch = time.time()
    role_feats = current_features or extract(state=state, spec=spec)
    current_features = None
    if epoch == 0 and with_coupling:  # the networks before adaptation
      writer.write(config.method, 0, features_lib.coupling(role_feats, two_branch=two_branch))
    feats = clustering_features(role_feats, spec, cc.method)
    if cc.method == 'dbscan' and cc.lam > 0:
      if source is None:
        raise ValueError('config.cluster.lam > 0 (source mixing) needs a source data set')
      source_feats = clustering_features(
          network_features(
              embed_fn, state, spec, source.train, config.data.eval_batch_size, students=False
          ),
          spec,
          cc.method,
      )
    labels, eps, info = make_pseudo_labels(config, feats, source_feats, epoch, eps, seed)
    stats = clustering.cluster_stats(labels, ds.train.pids)
    num_clusters = int(stats['num_clusters'])
    record = {'epoch': epoch + 1, **info, **{f'cluster/{k}': v for k, v in stats.items()}}
    if num_clusters > max_classes:
      raise ValueError(
          f'{num_clusters} clusters exceed config.cluster.max_classes='
          f'{max_classes}; raise it (the classifier width is fixed for the run)'
      )
    if num_clusters < 2:
      log(
          f'[{config.method}] epoch {epoch + 1}: clustering gave {num_clusters} cluster(s) '
          f'(noise {stats["noise_fraction"]:.0%}); skipping training this epoch. If this '
          'persists, check the features or the clustering settings (eps / rho, num_clusters).'
      )
      writer.write(config.method, epoch + 1, {**record, 'skipped': True})
      ckpt.save(epoch, state, {'epoch': epoch, 'eps': eps, 'best': best})
      continue
    centroids = clustering.centroids(feats, labels, num_clusters)
    state = set_all_classifiers(state, centroids, mesh)
    data = train_lib.replicate(
        train_lib.EpochData(
            images=images_dev,
            labels=labels.astype(np.int32),
            class_mask=models.class_mask(num_clusters, max_classes),
            target_images=empty,
        ),
        mesh,
    )
    batch_idx = input_pipeline.pk_epoch_indices(
        np.random.default_rng([seed, epoch, 0]),
        labels,
        ds.train.camids,
        iters=tc.iters,
        batch_size=batch,
        num_instances=config.data.num_instances,
    )
    # A fresh Adam state every epoch, as the references build a new optimizer per epoch.
    state = state.replace(opt_state=jax.jit(tx.init)(state.params))
    state, metrics, seconds = run_epoch(
        train_chunk, state, data, batch_idx, np.zeros_like(batch_idx), progress, epoch, chunk
    )
    progress.epoch_done(time.time() - t_epoch)
    record.update(metrics)
    record.update({'train_seconds': seconds, 'lr': float(tc.lr)})
    if with_coupling:  # the networks after this epoch (ABMT paper, Fig. 4)
      current_features = extract(state=state, spec=spec)
      record.update(features_lib.coupling(current_features, two_branch=two_branch))
    eval_now = tc.eval_every and ((epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs)
    if eval_now:
      per_net = {}
      for name, teacher in eval_roles:
        res = evaluate_variables(
            embed_fn,
            [state.variables(name, teacher=teacher)],
            target,
            batch_size=config.data.eval_batch_size,
            rerank=config.eval.rerank,
            branches=two_branch,
        )
        per_net[name] = res
        record.update({f'{name}/{k}': v for k, v in res.items()})
      # The model is network 1's teacher; picking the better of MMT's two on the test set is
      # the papers' choice and is only done with select_best_on_test.
      model_name = (
          max(per_net, key=lambda n: per_net[n]['mAP']) if tc.select_best_on_test else names[0]
      )
      last_results = dict(per_net[model_name], model=model_name, epoch=epoch + 1)
      record.update(
          {k: v for k, v in last_results.items() if k in ('mAP', 'top1', 'top5', 'top10')}
      )
      if tc.select_best_on_test and (best is None or last_results['mAP'] > best['mAP']):
        best = last_results
        ckpt.save(epoch, state, {'epoch': epoch, 'eps': eps, 'best': best}, kind='best')
    writer.write(config.method, epoch + 1, record)
    ckpt.save(
        epoch, state, {'epoch': epoch, 'eps': eps, 'best': best, 'last_results': last_results}
    )
    if eval_now:
      draw_plots(workdir, overview_only=True)
    log(
        f'[{config.method}] epoch {epoch + 1}/{tc.epochs} loss {metrics["loss/total"]:.3f} '
        f'clusters {num_clusters} noise {stats["noise_fraction"]:.0%}'
        + (f' purity {stats["purity"]:.2f} nmi {stats["nmi"]:.2f}' if 'nmi' in stats else '')
        + (f' | {results_line(last_results)}' if eval_now else '')
        + f' | {time.time() - t_epoch:.1f}s eta {format_duration(progress.eta(epoch))}'
    )
  # The reported model is the one exported: the best epoch's (and its network) with
  # select_best_on_test, else the last epoch's.
  if tc.select_best_on_test and best is not None:
    selected = dict(best, selection='best epoch on the target test set')
    export_state, _ = ckpt.restore(state, kind='best')
  else:
    selected, export_state = dict(last_results, selection='last epoch'), state
  export_model(
      os.path.join(workdir, 'model.msgpack'),
      export_state.variables(selected.get('model', names[0]), teacher=spec.ema),
  )
  ckpt.close()
  return selected


def export_model(path: str, variables: dict) -> None:
  """The run's model in the project's weight format (`jaxreid.convert`), next to config.json:
  what `python -m jaxreid.evaluate` / `jaxreid.search` and `config.init.checkpoints` read."""
  from jaxreid import convert

  convert.save_converted(path, jax.device_get(variables))
  log(f'[export] model written to {path}')


def draw_plots(workdir: str, *, overview_only: bool = False) -> None:
  """Redraws `<workdir>/plots/` (`jaxreid.plots`); a plotting problem never stops a run."""
  from jaxreid import plots

  try:
    written = plots.plot_run(workdir, per_panel=not overview_only, pretrain=not overview_only)
  except Exception as e:  # pylint: disable=broad-except
    log(f'[plots] skipped: {type(e).__name__}: {e}')
    return
  if written and not overview_only:
    log(f'[plots] {len(written)} figures in {os.path.join(workdir, "plots")}')


def loss_terms(config) -> tuple:
  """The method's objective from `config.loss`; weights left unset (None) take their defaults."""
  loss = {k: v for k, v in config.loss.to_dict().items() if v is not None}
  return objectives.objective_from_config(config.method, ml_collections.ConfigDict(loss))


def max_classes_for(config, n_train: int) -> int:
  """Fixed classifier width for the run (static shapes: no recompilation as clusters change)."""
  cc = config.cluster
  if cc.max_classes:
    return int(cc.max_classes)
  if cc.method == 'kmeans':
    return int(cc.num_clusters)
  return n_train  # DBSCAN: at most one cluster per image (the reference uses len(train) too)


def set_all_classifiers(state, centroids: np.ndarray, mesh):
  """Classifier rows of every student and teacher := L2-normalised centroids (docs/reference.md s.3)."""
  set_rows = jax.jit(models.set_classifier_rows)
  params = {n: set_rows(p, centroids) for n, p in state.params.items()}
  teacher = {n: set_rows(p, centroids) for n, p in state.teacher_params.items()}
  return train_lib.replicate(state.replace(params=params, teacher_params=teacher), mesh)


# ----------------------------------------------------------------------------------------------
# The whole experiment


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_safe_changes: bool = False
) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns the results table's rows.

  One process per work dir (a lock file); a rerun must use the config the work dir was started
  with (`jaxreid.workdir.remember_config`); a finished run is not redone: its results are read
  back and printed."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.Lock(workdir):
    results_path = os.path.join(workdir, 'results.json')
    config_path = os.path.join(workdir, 'config.json')
    current = json.loads(config.to_json_best_effort())
    unchanged = os.path.exists(config_path) and workdir_lib.read_config(config_path) == current
    workdir_lib.remember_config(config, workdir, allow_safe_changes=allow_safe_changes)
    if unchanged and os.path.exists(results_path):
      with open(results_path) as f:
        summary = json.load(f)
      log(
          f'[done] {workdir} holds a finished run of this config (use a new --workdir to run it '
          'again); its results:'
      )
      print_summary(config, summary)
      return summary
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
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
  target = load_and_decode(
      config.data.target, dataset_root(config, 'target'), h, w, synthetic=world
  )
  source = (
      load_and_decode(config.data.source, dataset_root(config, 'source'), h, w, synthetic=world)
      if needs_source
      else None
  )
  writer = MetricsWriter(workdir)
  initial, fresh_extra_block = load_initial(config)
  if config.method == 'pretrain':
    variables = pretrain(
        config,
        source,
        target,
        config.seed,
        os.path.join(workdir, f'pretrain_seed{config.seed}'),
        mesh,
        initial=initial,
    )
    model = build_model(config, source.dataset.num_train_pids)
    embed_fn = features_lib.make_embed_fn(model, mesh)
    results = {
        'source': evaluate_variables(
            embed_fn, [variables], source, batch_size=config.data.eval_batch_size
        ),
        'target': evaluate_variables(
            embed_fn, [variables], target, batch_size=config.data.eval_batch_size
        ),
    }
    writer.write(
        'pretrain_final', 0, {f'{k}/{m}': v for k, r in results.items() for m, v in r.items()}
    )
    summary = {
        'source domain (supervised)': results['source'],
        'target domain (source only)': results['target'],
    }
    print_summary(config, summary)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(summary, f, indent=2, default=float)
    return results
  students = source_models(config, source, target, workdir, mesh, initial, fresh_extra_block)
  spec = train_lib.METHODS[config.method]
  model = build_model(
      config, students[0]['params'][_classifier_key(students[0])]['kernel'].shape[1]
  )
  embed_fn = features_lib.make_embed_fn(model, mesh)
  source_only = evaluate_variables(
      embed_fn,
      [students[0]],
      target,
      batch_size=config.data.eval_batch_size,
      branches=config.model.arch == 'abmt',
  )
  writer.write('source_only', 0, source_only)
  log(f'[source only] target {results_line(source_only)}')
  adapted = adapt(config, target, source, students[: spec.num_students], workdir, mesh, writer)
  writer.close()
  summary = {'source only': source_only, f'{config.method} (adapted)': adapted}
  print_summary(config, summary)
  draw_plots(workdir)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(
        {k: {m: v for m, v in r.items()} for k, r in summary.items()}, f, indent=2, default=float
    )
  return summary


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
  from jaxreid import convert

  model = build_model(config, 1)
  report = {}
  variables = convert.load_weights(
      path, model, key='config.init.pretrained', drop_classifier=True, report=report
  )
  return variables, any('max_branch/extra' in p for p in report.get('fresh', ()))


def method_spec(config) -> train_lib.MethodSpec:
  """The method's networks and views; `config.train.teacher_views` (if set) overrides which
  independently augmented view each EMA teacher sees, e.g. `(1,)` gives ABMT's teacher a view of
  its own (the reference: the student's view) and `(0,)` gives the mean-teacher baseline's
  teacher the student's view (default: a second view)."""
  spec = train_lib.METHODS[config.method]
  views = _teacher_views(config)
  return dataclasses.replace(spec, teacher_views=views) if views else spec


def _teacher_views(config) -> tuple:
  """`config.train.teacher_views` as a tuple; () = the method's own views."""
  return tuple(config.train.get('teacher_views') or ())


def warm_start_max_branch(
    model, variables: dict, images: np.ndarray, seed: int, batches: int = 50, batch: int = 32
) -> dict:
  """ABMT from a single-branch re-ID model without source training (docs/reference.md section 9).

  The reference trains the max branch's random extra block during source pre-training; started
  from a downloaded model it would be untrained, and its random residual plus max pooling make
  the joint feature useless (measured, msmt17 -> market1501: joint mAP 3.5 against the avg
  branch's 24.8, then one cluster of 92% of the images). So the extra block starts as an identity
  (its last BN's scale and bias 0; it still learns) and the max branch's BatchNorm statistics (its copied
  last stage after max pooling, and its neck) are re-estimated on target images in train mode, no
  gradient; the shared trunk and the avg branch are untouched, so the avg branch is exactly the
  given model."""
  from flax import traverse_util

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
    return {**v, 'batch_stats': stats}

  rng = np.random.default_rng([seed, 12345])
  for _ in range(batches):  # momentum 0.1 per batch: the old statistics weigh 0.9^50 < 1%
    variables = update(variables, images[rng.choice(len(images), batch, replace=False)])
  log(
      f'[init] ABMT max branch: extra block as identity, BatchNorm statistics re-estimated on '
      f'{batches} x {batch} target images'
  )
  return jax.device_get(variables)


def source_models(
    config, source, target, workdir, mesh, initial, fresh_extra_block=False
) -> list[dict]:
  """The starting networks: given checkpoints, or pre-trained here (one per MMT network)."""
  spec = train_lib.METHODS[config.method]
  paths = [p for p in config.init.checkpoints if p]
  if paths:
    if len(paths) < spec.num_students:
      paths = paths * spec.num_students
    from jaxreid import convert

    model = build_model(config, 1)
    return [
        convert.load_weights(p, model, key='config.init.checkpoints', drop_classifier=True)
        for p in paths[: spec.num_students]
    ]
  if config.init.get('skip_pretrain', False):
    if initial is None:
      raise ValueError('config.init.skip_pretrain needs config.init.pretrained weights')
    if fresh_extra_block:
      initial = warm_start_max_branch(build_model(config, 1), initial, target.train, config.seed)
    return [initial] * spec.num_students
  # MMT pre-trains one model per network with different seeds (docs/reference.md section 3).
  seeds = [config.seed + k for k in range(spec.num_students)]
  return [
      pretrain(
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


def domain_name(config, which: str) -> str:
  """A readable name for the source / target data set (the folder name for a custom root)."""
  root = config.data.get(f'{which}_root', '')
  return os.path.basename(os.path.normpath(root)) if root else config.data[which]


def print_summary(config, summary: dict) -> None:
  title = f'{config.method}: {domain_name(config, "source")} -> {domain_name(config, "target")}'
  lines = [
      title,
      '-' * len(title),
      f'{"model":32s} {"mAP":>6s} {"top1":>6s} {"top5":>6s} {"top10":>6s}',
  ]
  for name, r in summary.items():
    if not r or 'mAP' not in r:
      lines.append(f'{name:32s} not evaluated (no epoch was evaluated: see the log above)')
    else:
      lines.append(
          f'{name:32s} {r["mAP"]:6.1f} {r["top1"]:6.1f} {r["top5"]:6.1f} ' f'{r["top10"]:6.1f}'
      )
  log('\n'.join(lines))


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
    'train.lr': (0.0, None, True),
    'train.weight_decay': (0.0, None, True),
    'train.ema_decay': (0.0, 1.0, False),
    'train.erasing_prob': (0.0, 1.0, True),
    'train.eval_every': (0, None, True),
    'train.log_every': (0, None, True),
    'cluster.num_clusters': (2, None, True),
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
      raise ValueError(f'config.{key}: {msg}')

  check(
      config.method in train_lib.METHODS,
      'method',
      f'{config.method!r} is not one of {sorted(train_lib.METHODS)}',
  )
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
  check(
      config.method != 'abmt' or config.model.arch == 'abmt',
      'model.arch',
      "method 'abmt' needs model.arch='abmt'",
  )
  check(config.pretrain.lr > 0 or not config.pretrain.epochs, 'pretrain.lr', 'must be > 0')
  check(config.train.lr > 0, 'train.lr', 'must be > 0')
  views = _teacher_views(config)
  if views:
    spec = train_lib.METHODS.get(config.method)
    check(
        spec is not None and spec.ema,
        'train.teacher_views',
        f'method {config.method!r} has no EMA teacher',
    )
    check(
        len(views) == spec.num_students,
        'train.teacher_views',
        f'needs one view index per teacher ({spec.num_students}), got {views}',
    )
    check(
        all(isinstance(v, int) and 0 <= v <= 3 for v in views),
        'train.teacher_views',
        f'view indices must be integers in 0..3, got {views}',
    )
  if config.method != 'pretrain':
    loss_terms(config)  # raises on unknown weight names
