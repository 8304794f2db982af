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
  batch_spec = NamedSharding(mesh, P('data')) if mesh is not None else None

  def constrain(x):
    return jax.lax.with_sharding_constraint(x, batch_spec) if batch_spec is not None else x

  def forward(variables, x, key):
    out, updates = model.apply(
        variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': key}
    )
    return out, updates['batch_stats']

  def step(state: TrainState, data: EpochData, batch_idx, target_idx):
    rng, aug_key, drop_key, target_key = jax.random.split(state.rng, 4)
    images = constrain(data.images[batch_idx])
    labels = methods_lib.Labels(data.labels[batch_idx], data.class_mask)
    if augment:
      views = [
          constrain(input_pipeline.augment(k, images, pad=crop_pad, erasing_prob=erasing_prob))
          for k in jax.random.split(aug_key, method.num_views)
      ]
    else:
      views = [constrain(input_pipeline.normalize(images))] * method.num_views
    drop_keys = jax.random.split(drop_key, 2 * len(names))

    outputs = {}
    teacher_stats = {}
    if method.ema:
      for i, name in enumerate(names):
        out, teacher_stats[name] = forward(
            state.variables(name, teacher=True),
            views[method.teacher_views[i]],
            drop_keys[len(names) + i],
        )
        outputs.update(_flatten_outputs(f'teacher{i + 1}', jax.lax.stop_gradient(out)))

    def loss_fn(params):
      outs = dict(outputs)
      new_stats = {}
      for i, name in enumerate(names):
        out, new_stats[name] = forward(
            {'params': params[name], 'batch_stats': state.batch_stats[name]},
            views[method.student_views[i]],
            drop_keys[i],
        )
        outs.update(_flatten_outputs(f'student{i + 1}', out))
      loss_value, metrics = loss(outs, labels)
      return loss_value, (metrics, new_stats)

    (_, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

    if target_bn_pass:
      # Pre-training: a no-grad train-mode forward of a target batch so that the BN running
      # statistics also see the target domain (before the update, as the reference does).
      t_images = constrain(data.target_images[target_idx])
      t_view = input_pipeline.augment(target_key, t_images, pad=crop_pad, erasing_prob=erasing_prob)
      for name in names:
        _, new_stats[name] = forward(
            {'params': state.params[name], 'batch_stats': new_stats[name]}, t_view, target_key
        )

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    teacher_params = state.teacher_params
    if method.ema:
      alpha = ema_decay_at(state.step, ema_decay)
      teacher_params = jax.tree.map(
          lambda t, s: alpha * t + (1.0 - alpha) * s, state.teacher_params, params
      )
    metrics = dict(metrics)
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
