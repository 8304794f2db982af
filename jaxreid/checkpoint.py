"""Orbax checkpoints in the work dir: `latest` (for resuming) and `best` (optional model selection).

Each checkpoint holds the whole train state pytree (students, EMA teachers, BN statistics, optimizer
state, step, PRNG key) plus a small JSON record of host-side state (epoch, clustering eps, best mAP).
Everything random in a run is derived from (seed, epoch), so restoring the state of the last
finished epoch and re-running from there reproduces an uninterrupted run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores `(state, meta)` pairs under `<workdir>/checkpoints/{latest,best}`."""

  def __init__(self, workdir: str):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           enable_async_checkpointing=False)
    self._managers = {
        kind: ocp.CheckpointManager(os.path.join(self.directory, kind), options=options,
                                    item_names=('state', 'meta'))
        for kind in ('latest', 'best')
    }

  def save(self, step: int, state: Any, meta: dict, *, kind: str = 'latest') -> None:
    manager = self._managers[kind]
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()

  def latest_step(self, kind: str = 'latest') -> int | None:
    return self._managers[kind].latest_step()

  def restore(self, target: Any, *, kind: str = 'latest', step: int | None = None):
    """Restores into the structure (and shardings) of `target`; returns (state, meta)."""
    manager = self._managers[kind]
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no {kind!r} checkpoint under {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()
