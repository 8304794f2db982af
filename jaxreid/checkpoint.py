"""Orbax checkpoints in the work dir: `latest` (for resuming) and `best` (optional model selection).

Each checkpoint holds the whole train state pytree (students, EMA teachers, BN statistics, optimizer
state, step, PRNG key) plus a small JSON record of host-side state (epoch, clustering eps, best mAP).
Everything random in a run is derived from (seed, epoch), so restoring the state of the last
finished epoch and re-running from there reproduces an uninterrupted run.

The last two epochs are kept: a damaged newest checkpoint (a killed write, a full disk, a corrupt
file) is reported by name and the one before it is restored instead.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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
