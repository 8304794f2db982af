"""Train states, the optimizer and the jitted training epochs of every method.

A method (`jaxreid.methods.Method`) says how many student networks it trains, whether they have
EMA teachers, which augmented view each network sees and its loss function. One step function
serves all methods; `lax.scan` runs a chunk of steps on the device with no host round trip; the
host only builds the epoch's `(iters, batch)` index array and the label array between epochs
(docs/reference.md section 3); `run_epoch` drives one epoch from the host.

Data parallelism: `jit` over a 1-D mesh `('data',)`, batches sharded, everything else replicated.
BatchNorm statistics are taken over the global batch (or fixed groups of images with
`model.norm_group_size`), so results do not depend on the number of devices.
"""

from __future__ import annotations

import re
import time
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from jaxreid import distributed
from jaxreid import input_pipeline
from jaxreid import methods as methods_lib
from jaxreid import models
from jaxreid.metrics_writer import Progress
from jaxreid.metrics_writer import log


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed whole).

  `params` / `batch_stats` map network names ('net1', 'net2') to that student's variables;
  `teacher_params` / `teacher_batch_stats` hold the EMA teachers (empty dicts without EMA).
  Teachers have their own BN statistics, updated by their own train-mode forwards; only
  parameters are averaged (docs/reference.md section 3).
  """

  step: jax.Array
  params: dict
  batch_stats: dict
  teacher_params: dict
  teacher_batch_stats: dict
  opt_state: Any
  rng: jax.Array

  def variables(self, name: str, teacher: bool = False) -> dict:
    if teacher:
      return {'params': self.teacher_params[name], 'batch_stats': self.teacher_batch_stats[name]}
    return {'params': self.params[name], 'batch_stats': self.batch_stats[name]}


# ----------------------------------------------------------------------------------------------
# Optimizer


def make_optimizer(
    learning_rate,
    *,
    weight_decay: float = 5e-4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    frozen: Sequence[str] = (),
) -> optax.GradientTransformation:
  """Adam with *coupled* L2 weight decay, as `torch.optim.Adam(weight_decay=...)` does.

  The decay term `wd * theta` is added to the gradient before the Adam moments (not AdamW's
  decoupled decay). Parameters whose '/'-joined path matches a regex in `frozen` get no update.
  """
  tx = optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.scale_by_learning_rate(learning_rate),
  )
  if not frozen:
    return tx
  patterns = [re.compile(p) for p in frozen]

  def label_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'frozen' if any(p.search(_path_str(path)) for p in patterns) else 'train',
        params,
    )

  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, label_fn)


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def warmup_multistep_schedule(
    base_lr: float,
    iters_per_epoch: int,
    *,
    warmup_epochs: int = 10,
    warmup_factor: float = 0.01,
    milestones: Sequence[int] = (40, 70),
    gamma: float = 0.1,
) -> Callable:
  """The reference's WarmupMultiStepLR, stepped once per epoch (docs/reference.md section 3).

  factor(e) = warmup_factor * (1 - e / W) + e / W for e < W, then gamma ** (#milestones <= e).
  """
  milestones_arr = jnp.asarray(sorted(milestones), jnp.int32)

  def schedule(step):
    epoch = step // iters_per_epoch
    alpha = epoch / max(warmup_epochs, 1)
    warm = jnp.where(epoch < warmup_epochs, warmup_factor * (1 - alpha) + alpha, 1.0)
    decay = gamma ** jnp.sum(epoch >= milestones_arr)
    return base_lr * warm * decay

  return schedule


# ----------------------------------------------------------------------------------------------
# State creation


def create_train_state(
    method: methods_lib.Method,
    students: Sequence[dict],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    *,
    step: int = 0,
) -> TrainState:
  """Builds the state from per-network variables; every teacher starts as a copy of its student."""
  names = method.networks
  if len(students) != len(names):
    raise ValueError(f'{len(names)} networks expected, got {len(students)}')
  params = {n: v['params'] for n, v in zip(names, students)}
  batch_stats = {n: v.get('batch_stats', {}) for n, v in zip(names, students)}
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  return TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      batch_stats=batch_stats,
      teacher_params=copy(params) if method.ema else {},
      teacher_batch_stats=copy(batch_stats) if method.ema else {},
      opt_state=tx.init(params),
      rng=rng,
  )


def init_opt_state(tx: optax.GradientTransformation, params, mesh: Mesh):
  """A fresh optimizer state placed like the rest of the train state (replicated on the mesh).
  Unplaced, its step counter differs in sharding from the one a training chunk returns, and the
  epoch's second chunk compiles the step again."""
  return jax.jit(tx.init, out_shardings=NamedSharding(mesh, P()))(params)


def ema_decay_at(step, decay: float):
  """alpha_t = min(1 - 1/(t+1), decay): the teacher equals the student after step 0."""
  return jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), decay)


# ----------------------------------------------------------------------------------------------
# The step


@flax.struct.dataclass
class EpochData:
  """Device-resident arrays an epoch reads; array arguments, so new labels never recompile."""

  images: jax.Array  # (N, H, W, 3) uint8
  labels: jax.Array  # (N,) int32, -1 = excluded
  class_mask: jax.Array  # (C,) bool, active classifier rows
  target_images: jax.Array  # (M, H, W, 3) uint8 for pre-training's BN pass, else (0, H, W, 3)


def _flatten_outputs(prefix: str, out) -> dict:
  if isinstance(out, Mapping):
    return {f'{prefix}/{k}': v for k, v in out.items()}
  raise TypeError(f'train-mode model output must be a dict, got {type(out)}')


def make_train_step(
    method: methods_lib.Method,
    model,
    tx: optax.GradientTransformation,
    *,
    loss: Callable | None = None,
    ema_decay: float = 0.999,
    erasing_prob: float = 0.5,
    crop_pad: int = 10,
    target_bn_pass: bool = False,
    augment: bool = True,
    mesh: Mesh | None = None,
) -> Callable:
  """Returns `step(state, data, batch_idx, target_idx) -> (state, metrics)` (pure, unjitted).

  `loss(outputs, labels) -> (total, metrics)` is the objective with its weights bound; None: the
  method's own with its default weights (`jaxreid.methods.objective`). `augment=False` feeds the
  normalised images unchanged (every view identical), for tests and diagnostics.
  """
  loss = loss or methods_lib.objective(method)
  names = method.networks
  batch = _make_batch(method, crop_pad, erasing_prob, augment, mesh)

  def step(state: TrainState, data: EpochData, batch_idx, target_idx):
    rng, _, _, target_key = jax.random.split(state.rng, 4)  # `batch` takes the middle two
    views, labels, drop_keys, outputs, teacher_stats = batch(model, state, data, batch_idx)

    def loss_fn(params):
      outs, new_stats = _student_outputs(model, method, state, params, views, drop_keys)
      loss_value, metrics = loss({**outputs, **outs}, labels)
      return loss_value, (metrics, new_stats)

    (_, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

    if target_bn_pass:
      # Pre-training: a no-grad train-mode forward of a target batch so that the BN running
      # statistics also see the target domain (before the update, as the reference does).
      t_images = _constrain(data.target_images[target_idx], mesh)
      t_view = input_pipeline.augment(target_key, t_images, pad=crop_pad, erasing_prob=erasing_prob)
      for name in names:
        _, new_stats[name] = _forward(
            model,
            {'params': state.params[name], 'batch_stats': new_stats[name]},
            t_view,
            target_key,
        )

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    teacher_params = state.teacher_params
    if method.ema:
      alpha = ema_decay_at(state.step, ema_decay)
      teacher_params = jax.tree.map(
          lambda t, s: alpha * t + (1.0 - alpha) * s, state.teacher_params, params
      )
    metrics = {k: v for k, v in metrics.items() if not k.startswith(WEIGHTED)}
    metrics['grad_norm'] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    # 1.0 when every parameter and running statistic is finite: a finite loss can still come with
    # a NaN gradient (lr far too high) that poisons the parameters; checked per chunk by the
    # driver, which then stops before anything is checkpointed.
    metrics['finite'] = jnp.all(
        jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, new_stats, teacher_params))]
        )
    ).astype(jnp.float32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=new_stats,
        teacher_params=teacher_params,
        teacher_batch_stats={**state.teacher_batch_stats, **teacher_stats},
        opt_state=opt_state,
        rng=rng,
    )
    return new_state, metrics

  return step


def _constrain(x, mesh):
  """The batch axis sharded over the mesh (no-op without one)."""
  return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P('data')))


def _forward(model, variables, x, key, pooled_offset=None):
  out, updates = model.apply(
      variables,
      x,
      train=True,
      pooled_offset=pooled_offset,
      mutable=['batch_stats'],
      rngs={'dropout': key},
  )
  return out, updates['batch_stats']


def _make_batch(method, crop_pad, erasing_prob, augment, mesh):
  """`batch(model, state, data, batch_idx) -> (views, labels, student dropout keys, teacher
  outputs, teacher BN statistics)`: what one step reads before the students' forward. The keys
  come from `state.rng` (the step advances it; the gradient shares read the same batch)."""
  names = method.networks

  def batch(model, state, data, batch_idx):
    _, aug_key, drop_key, _ = jax.random.split(state.rng, 4)
    images = _constrain(data.images[batch_idx], mesh)
    labels = methods_lib.Labels(data.labels[batch_idx], data.class_mask)
    if augment:
      views = [
          _constrain(
              input_pipeline.augment(k, images, pad=crop_pad, erasing_prob=erasing_prob), mesh
          )
          for k in jax.random.split(aug_key, method.num_views)
      ]
    else:
      views = [_constrain(input_pipeline.normalize(images), mesh)] * method.num_views
    drop_keys = jax.random.split(drop_key, 2 * len(names))
    outputs, teacher_stats = {}, {}
    if method.ema:
      for i, name in enumerate(names):
        out, teacher_stats[name] = _forward(
            model,
            state.variables(name, teacher=True),
            views[method.teacher_views[i]],
            drop_keys[len(names) + i],
        )
        outputs.update(_flatten_outputs(f'teacher{i + 1}', jax.lax.stop_gradient(out)))
    return views, labels, drop_keys[: len(names)], outputs, teacher_stats

  return batch


def _student_outputs(model, method, state, params, views, drop_keys, pooled_offsets=None):
  """Every student's train-mode outputs ('student1/features', ...) and new BN statistics."""
  outs, new_stats = {}, {}
  for i, name in enumerate(method.networks):
    out, new_stats[name] = _forward(
        model,
        {'params': params[name], 'batch_stats': state.batch_stats[name]},
        views[method.student_views[i]],
        drop_keys[i],
        None if pooled_offsets is None else pooled_offsets[name],
    )
    outs.update(_flatten_outputs(f'student{i + 1}', out))
  return outs, new_stats


# ----------------------------------------------------------------------------------------------
# Gradient diagnostics

WEIGHTED = methods_lib.WEIGHTED  # metrics prefix of a loss's weighted terms
OTHER_TERM = 'other'  # what a loss adds to its total beyond its named weighted terms
LOW_SHARE = 0.01  # a term under 1% of the gradient is flagged


def make_gradient_shares(
    method: methods_lib.Method,
    model,
    *,
    loss: Callable | None = None,
    erasing_prob: float = 0.5,
    crop_pad: int = 10,
    augment: bool = True,
    mesh: Mesh | None = None,
) -> Callable:
  """`shares(state, data, batch_idx) -> {term: share}` (pure, unjitted): how much of the gradient
  each weighted loss term carries on the batch the next training step would see.

  The gradient of each weighted term w_t L_t is taken with respect to the pooled trunk features
  p_h of every student network and branch h (the one tensor every term flows through: the
  triplet terms through the embedding, the classification terms through the neck and
  classifier); n_t = sqrt(sum_h |g_t,h|^2 |p_h|^2) (a parameter gradient upstream of p_h scales
  with both: branches whose features differ in scale, ABMT's max pooling, compare as their
  trunks' gradients do), and share_t = n_t / sum_s n_s. The terms are the loss's `weighted/<term>` metrics
  (`methods.weighted_sum` writes them; a custom loss built on a method's loss inherits them);
  whatever the total holds beyond them is the term 'other'. Nothing is updated.
  """
  loss = loss or methods_lib.objective(method)
  batch = _make_batch(method, crop_pad, erasing_prob, augment, mesh)
  shape = (models.num_heads(model), None, models.pooled_dim(model))
  heads = ('avg/', 'max/') if shape[0] == 2 else ('',)

  def shares(state: TrainState, data: EpochData, batch_idx):
    views, labels, drop_keys, outputs, _ = batch(model, state, data, batch_idx)
    zeros = {
        n: jnp.zeros((shape[0], batch_idx.shape[0], shape[2]), jnp.float32) for n in method.networks
    }

    def weighted_terms(offsets):
      outs, _ = _student_outputs(model, method, state, state.params, views, drop_keys, offsets)
      pooled = {
          n: jnp.stack([outs[f'student{i + 1}/{h}pooled'] for h in heads])
          for i, n in enumerate(method.networks)
      }
      outs = {k: v for k, v in outs.items() if not k.endswith('pooled')}
      total, metrics = loss({**outputs, **outs}, labels)
      terms = {k[len(WEIGHTED) :]: v for k, v in metrics.items() if k.startswith(WEIGHTED)}
      terms[OTHER_TERM] = total - sum(terms.values())
      return terms, pooled

    jac, pooled = jax.jacrev(weighted_terms, has_aux=True)(zeros)
    # |g| of each head scaled by that head's |pooled feature|: a parameter gradient upstream
    # scales with both, so heads whose features differ in scale (ABMT's max pooling) compare.
    scale = {n: jnp.sqrt(jnp.sum(jnp.square(p), axis=(1, 2))) for n, p in pooled.items()}
    norms = {
        t: jnp.sqrt(
            sum(jnp.sum(jnp.square(g), axis=(1, 2)) @ jnp.square(scale[n]) for n, g in tree.items())
        )
        for t, tree in jac.items()
    }
    total = sum(norms.values())
    return {t: n / jnp.maximum(total, 1e-30) for t, n in norms.items()}

  return shares


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """A (B,) index array sharded over the mesh's batch axis."""
  return NamedSharding(mesh, P('data'))


def jit_gradient_shares(shares_fn: Callable, mesh: Mesh) -> Callable:
  """`make_gradient_shares`' function jitted over the mesh (state and data replicated, the
  batch indices sharded), returning replicated shares."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(
      shares_fn,
      in_shardings=(replicated, replicated, batch_sharding(mesh)),
      out_shardings=replicated,
  )


def low_share_warnings(shares: Mapping[str, float], threshold: float = LOW_SHARE) -> list[str]:
  """One line per named term under `threshold` of the gradient (the remainder 'other' is
  reported only when it is a term of its own, above 0.1%: below, it is rounding)."""
  return [
      f'{t} carries {s:.1%} of the gradient: its input may be mis-scaled'
      for t, s in shares.items()
      if t != OTHER_TERM and s < threshold
  ]


def reported_shares(shares: Mapping[str, float]) -> dict[str, float]:
  """The shares worth a record: every named term, and 'other' when above 0.1%."""
  return {t: float(s) for t, s in shares.items() if t != OTHER_TERM or s > 1e-3}


def make_train_chunk(step_fn: Callable, mesh: Mesh, *, use_scan: bool | None = None) -> Callable:
  """`chunk(state, data, batch_idx (S, B), target_idx (S, B)) -> (state, metrics (S,))`.

  Two equivalent drivers, both with the state buffer donated and no host synchronisation:
  `lax.scan` over the S steps in one program (best on GPU / TPU), or a Python loop dispatching
  one jitted step per iteration (asynchronously). XLA:CPU runs a convolution network several
  times slower inside a while loop than as a top-level program (docs/reference.md, "Where
  jaxreid departs"), so `use_scan=None` picks the loop on CPU and scan elsewhere.
  """
  replicated = NamedSharding(mesh, P())
  if use_scan is None:
    use_scan = jax.default_backend() != 'cpu'
  # Indices: (S, B) for a scanned chunk, (B,) per step; the batch axis is sharded.
  idx_sharding = NamedSharding(mesh, P(None, 'data') if use_scan else P('data'))

  def compile_fn(fn):
    jitted = jax.jit(
        fn,
        donate_argnums=(0,),
        in_shardings=(replicated, replicated, idx_sharding, idx_sharding),
        out_shardings=(replicated, replicated),
    )

    def call(state, data, batch_idx, target_idx):
      put = lambda idx: distributed.put(idx, idx_sharding)
      return jitted(state, data, put(batch_idx), put(target_idx))

    return call

  if use_scan:

    def chunk(state, data, batch_idx, target_idx):
      def body(s, idx):
        return step_fn(s, data, idx[0], idx[1])

      return jax.lax.scan(body, state, (batch_idx, target_idx))

    return compile_fn(chunk)

  step = compile_fn(step_fn)

  def loop(state, data, batch_idx, target_idx):
    per_step = []
    for i in range(len(batch_idx)):
      state, metrics = step(state, data, batch_idx[i], target_idx[i])
      per_step.append(metrics)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *per_step)

  return loop


def make_mesh() -> Mesh:
  """A 1-D mesh over every device; the batch axis is sharded over it."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------------------------
# The host side of an epoch (shared by pre-training and adaptation)


class NonFiniteLossError(RuntimeError):
  """The loss, the gradient or the parameters stopped being finite (nothing was saved)."""


def chunk_size(iters: int, log_every: int) -> int:
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
