"""Several processes (hosts) as one run, on `jax.distributed` (docs/design.md, "Several hosts").

Every process runs the same program over one global mesh of all devices: batches are sharded
across every device of every process, parameters replicated, so the jitted steps are the
single-process ones. Host-side work is split like this:
* decoding: each process decodes a contiguous share of the images, then all shares are gathered
  (`gather_rows`), so every process holds the same uint8 arrays;
* clustering: done once, by process 0, and its labels (and DBSCAN's eps) broadcast to the others
  (`broadcast`), so every process trains on the same pseudo labels;
* evaluation: the features are replicated on every device, each process scores them (the same
  numbers);
* files: only process 0 writes logs, metrics, plots, results and the model, and holds the work
  dir's lock; the Orbax checkpoints are written collectively (process 0 writes replicated arrays).

With one process (the default) every function here is a no-op.
"""

from __future__ import annotations

from typing import Any
from typing import Callable

import jax
from jax.experimental import multihost_utils
import numpy as np

_PROCESS_INDEX = 0
_PROCESS_COUNT = 1


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Joins the run (before any device is used). CPU processes talk through gloo collectives."""
  global _PROCESS_INDEX, _PROCESS_COUNT
  # Only the CPU backend reads this; without it CPU processes cannot run collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
  )
  _PROCESS_INDEX, _PROCESS_COUNT = jax.process_index(), jax.process_count()


def process_index() -> int:
  return _PROCESS_INDEX


def process_count() -> int:
  return _PROCESS_COUNT


def is_primary() -> bool:
  """Process 0: the one that writes files and clusters."""
  return _PROCESS_INDEX == 0


def broadcast(tree: Any) -> Any:
  """Process 0's value of a pytree of arrays / scalars, on every process (same structure and
  shapes everywhere)."""
  if _PROCESS_COUNT == 1:
    return tree
  return multihost_utils.broadcast_one_to_all(tree)


def gather_rows(compute: Callable[[int, int], np.ndarray], n: int) -> np.ndarray:
  """Rows 0..n of an array, each process computing `compute(start, stop)` for its contiguous
  share; the shares are gathered so that every process returns all n rows."""
  if _PROCESS_COUNT == 1:
    return compute(0, n)
  share = -(-n // _PROCESS_COUNT)
  start = min(n, _PROCESS_INDEX * share)
  stop = min(n, start + share)
  local = compute(start, stop)
  padded = np.zeros((share,) + local.shape[1:], local.dtype)
  padded[: len(local)] = local
  gathered = multihost_utils.process_allgather(padded, tiled=True)
  return np.asarray(gathered)[:n]


def put(x, sharding):
  """A host array every process holds identically, as a global array of `sharding` (a jitted
  function refuses host arrays for a sharded argument across processes). One process: `x`."""
  if _PROCESS_COUNT == 1:
    return x
  return jax.device_put(x, sharding)


def sync(name: str) -> None:
  """Waits until every process reaches this point."""
  if _PROCESS_COUNT > 1:
    multihost_utils.sync_global_devices(name)
