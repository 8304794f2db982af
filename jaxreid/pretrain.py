"""Stage 1: supervised source pre-training (docs/reference.md section 3).

CE + softmax triplet on the source labels with a warm-up multi-step learning rate; every
iteration also runs a no-grad train-mode forward of a target batch so that the BatchNorm
statistics see the target domain, as the reference does. Resumable from its checkpoints.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxreid import checkpoint as checkpoint_lib
from jaxreid import features as features_lib
from jaxreid import input_pipeline
from jaxreid import methods as methods_lib
from jaxreid import models
from jaxreid import numpy_init
from jaxreid import reporting
from jaxreid import train as train_lib
from jaxreid.evaluator import Evaluator
from jaxreid.input_pipeline import DecodedSet
from jaxreid.metrics_writer import MetricsWriter
from jaxreid.metrics_writer import Progress
from jaxreid.metrics_writer import format_duration
from jaxreid.metrics_writer import log


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
  model = models.create_model(config.model, num_classes=num_classes)
  method = methods_lib.get('pretrain')
  rng = jax.random.PRNGKey(seed)
  fresh = numpy_init.init_variables(model, seed)
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
  state = train_lib.create_train_state(method, [variables], tx, jax.random.fold_in(rng, 1))
  state = train_lib.replicate(state, mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir)
  writer = MetricsWriter(workdir)
  start_epoch = 0
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    start_epoch = meta['epoch'] + 1
    log(f'[pretrain seed {seed}] resuming after epoch {start_epoch} from {ckpt.directory}')
  use_target = target is not None and pc.target_bn
  # The loss weights of config.loss when the run is a pre-training run, else the defaults.
  loss = methods_lib.objective(method, config.loss if config.method == 'pretrain' else None)
  step_fn = train_lib.make_train_step(
      method,
      model,
      tx,
      loss=loss,
      erasing_prob=pc.erasing_prob,
      crop_pad=config.data.crop_pad,
      target_bn_pass=use_target,
      mesh=mesh,
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
  chunk = train_lib.chunk_size(pc.iters, config.train.log_every)
  progress = Progress(f'pretrain seed {seed}', pc.epochs, pc.iters, start_epoch)
  embed_fn = features_lib.make_embed_fn(model, mesh)
  source_evaluator = Evaluator.of_decoded(source)
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
    state, metrics, seconds = train_lib.run_epoch(
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
    if eval_now and source.dataset.has_test_split:
      res = source_evaluator.run(
          embed_fn, [state.variables('net1')], batch_size=config.data.eval_batch_size
      )
      record.update({f'source_{k}': v for k, v in res.items()})
    writer.write('pretrain', epoch + 1, record)
    eta = progress.eta(epoch)
    log(
        f'[pretrain seed {seed}] epoch {epoch + 1}/{pc.epochs} loss {metrics["loss/total"]:.3f} '
        f'lr {record["lr"]:.2e} {seconds:.1f}s eta {format_duration(eta)}'
        + (
            f' | source {reporting.results_line({k[7:]: v for k, v in record.items() if k.startswith("source_")})}'
            if 'source_mAP' in record
            else ''
        )
    )
    ckpt.save(epoch, state, {'epoch': epoch, 'stage': 'pretrain', 'seed': seed})
  ckpt.close()
  writer.close()
  variables = jax.device_get(state.variables('net1'))
  # The source model in the project's weight format, reusable via config.init.checkpoints.
  path = os.path.join(workdir, 'model.msgpack')
  checkpoint_lib.save_weights(path, variables)
  log(f'[export] model written to {path}')
  return variables


def _random_batches(rng: np.random.Generator, n: int, iters: int, batch: int) -> np.ndarray:
  """Shuffled passes over n items cut into (iters, batch) (the reference's plain loader)."""
  needed = iters * batch
  order = np.concatenate([rng.permutation(n) for _ in range(-(-needed // n))])[:needed]
  return order.reshape(iters, batch).astype(np.int32)
