"""What a run stores: Orbax checkpoints in the work dir, and the project's weight file.

Checkpoints, `latest` (for resuming) and `best` (optional model selection): each holds the whole
train state pytree (students, EMA teachers, BN statistics, optimizer state, step, PRNG key) plus a
small JSON record of host-side state (epoch, clustering eps, best mAP). Everything random in a run
is derived from (seed, epoch), so restoring the state of the last finished epoch and re-running
from there reproduces an uninterrupted run. The last two epochs are kept: a damaged newest
checkpoint (a killed write, a full disk, a corrupt file) is reported by name and the one before it
is restored instead.

Weights (`save_weights`, `read_weights`, `load_weights`): one network's variables as a flax
msgpack of `{'params', 'batch_stats'}` (numpy float32 leaves, no pickle), the format of a run's
`model.msgpack`, of pre-training's `pretrain_seed{s}/model.msgpack` and of `jaxreid-convert`'s
output; what `jaxreid-evaluate`, `jaxreid-search` and `config.init.*` read. `load_weights` also
takes a PyTorch file and converts it on the fly (`jaxreid.convert`, nothing executed from it).
"""

from __future__ import annotations

import os
import pickle
from typing import Any
from typing import Mapping
import zipfile

from flax import serialization
from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxreid import convert
from jaxreid import distributed
from jaxreid import models
from jaxreid import torch_file
from jaxreid.metrics_writer import log

KEEP = 2


class CheckpointError(RuntimeError):
  """No readable checkpoint where one should be; the message names the files and what to do."""


class Checkpointer:
  """Saves and restores `(state, meta)` pairs under `<workdir>/checkpoints/{latest,best}`."""

  def __init__(self, workdir: str, keep: int = KEEP):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    self._managers: dict[str, ocp.CheckpointManager] = {}
    for kind in ('latest', 'best'):  # open what exists; `best` is only created when saved
      if os.path.isdir(os.path.join(self.directory, kind)):
        self._manager(kind)

  def _manager(self, kind: str) -> ocp.CheckpointManager:
    if kind not in self._managers:
      self._managers[kind] = ocp.CheckpointManager(
          os.path.join(self.directory, kind), options=self._options, item_names=('state', 'meta')
      )
    return self._managers[kind]

  def save(self, step: int, state: Any, meta: dict, *, kind: str = 'latest') -> None:
    manager = self._manager(kind)
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    manager.wait_until_finished()

  def latest_step(self, kind: str = 'latest') -> int | None:
    manager = self._managers.get(kind)
    return None if manager is None else manager.latest_step()

  def restore(self, target: Any, *, kind: str = 'latest', step: int | None = None):
    """Restores into the structure (and shardings) of `target`; returns (state, meta).

    Without `step`, the newest readable checkpoint: a damaged one is named and skipped."""
    manager = self._managers.get(kind)
    steps = [] if manager is None else sorted(manager.all_steps(), reverse=True)
    if step is not None:
      steps = [step]
    if not steps:
      raise FileNotFoundError(f'no {kind!r} checkpoint under {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    damaged = []
    for s in steps:
      try:
        restored = manager.restore(
            s,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
      except Exception as e:  # noqa: BLE001 - Orbax / tensorstore raise many unrelated types
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        damaged.append(f'{os.path.join(self.directory, kind, str(s))} ({reason})')
        continue
      if damaged:
        log(
            f'[checkpoint] unreadable, skipped: {"; ".join(damaged)}; restored the previous '
            f'one ({kind} step {s})'
        )
      return restored['state'], dict(restored['meta'])
    raise CheckpointError(
        f'no readable {kind!r} checkpoint: {"; ".join(damaged)}. Delete '
        f'{os.path.join(self.directory, kind)} to start this stage again (finished stages '
        'and pre-trained models are kept), or use a new --workdir.'
    )

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()


# ----------------------------------------------------------------------------------------------
# The project's weight file


def save_weights(path: str, variables: Mapping) -> None:
  """Writes `{'params', 'batch_stats'}` of `variables` (host or device arrays) as flax msgpack
  of numpy leaves; written next to `path`, then renamed (never half a file). In a run of
  several processes (`jaxreid.distributed`) only process 0 writes."""
  if not distributed.is_primary():
    return

  tree = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  data = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, tree))
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def read_weights(path: str, model=None, check_classifier_width: bool = True) -> dict:
  """Reads `save_weights`' file (nested dicts of numpy arrays). With `model`, also checks every
  variable's path and shape (`check_weights`). Raises `convert.ConversionError` naming the file:
  not this format, or not this model."""
  with open(path, 'rb') as f:
    try:
      variables = serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types
      raise convert.ConversionError(
          f'{path}: not a jaxreid .msgpack weight file nor a PyTorch file '
          f'({type(e).__name__}: {e})'
      ) from None
  if (
      not isinstance(variables, dict)
      or set(variables) - {'params', 'batch_stats'}
      or 'params' not in variables
  ):
    raise convert.ConversionError(f'{path}: expected a msgpack of {{params, batch_stats}}')
  if model is not None:
    check_weights(variables, model, path, check_classifier_width)
  return variables


def check_weights(
    variables: Mapping, model, what: str = 'the weights', check_classifier_width: bool = True
) -> None:
  """Raises `convert.ConversionError` listing the missing, unexpected and mis-shaped variables of
  `variables` for `model` (the classifiers' width is not compared if `check_classifier_width` is
  False); `what` names them in the message."""
  want = traverse_util.flatten_dict(models.abstract_variables(model, 64, 64))
  have = traverse_util.flatten_dict(variables)
  misshaped = [
      f'{"/".join(p)}: {np.shape(have[p])} vs {tuple(want[p].shape)}'
      for p in sorted(set(want) & set(have))
      if np.shape(have[p]) != tuple(want[p].shape)
      and (check_classifier_width or not p[1].endswith('classifier'))
  ]
  missing = ['/'.join(p) for p in sorted(set(want) - set(have))]
  unexpected = ['/'.join(p) for p in sorted(set(have) - set(want))]
  if missing or unexpected or misshaped:
    raise convert.ConversionError(
        convert.mismatch_message(what, model, missing, unexpected, misshaped)
    )


def load_weights(
    path: str,
    model,
    *,
    key: str = 'weights',
    drop_classifier: bool = False,
    report: dict | None = None,
) -> dict:
  """Variables for `model` from a `.msgpack` (`save_weights`) or a PyTorch file (any format
  `convert.convert_state_dict` knows, converted on the fly, nothing executed). Every problem is
  one `convert.ConversionError` naming `key` (e.g. the config field), the file and what to do.
  `drop_classifier`: PyTorch classifiers are left out (fresh rows) and a msgpack's classifier
  width is not checked. `report`: as for `convert.convert_state_dict` (PyTorch files only)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise convert.ConversionError(f'{key}={path!r} does not exist')
  try:
    if torch_file.is_torch_file(path):
      sd = convert.extract_state_dict(torch_file.load(path))
      if drop_classifier:
        sd = {k: v for k, v in sd.items() if not k.split('.')[0].startswith('classifier')}
      return convert.convert_state_dict(sd, model, report=report)
    return read_weights(path, model, check_classifier_width=not drop_classifier)
  except (
      convert.ConversionError,
      pickle.UnpicklingError,
      zipfile.BadZipFile,
      OSError,
      ValueError,
  ) as e:
    raise convert.ConversionError(f'{key}={path!r}: {e}') from None
