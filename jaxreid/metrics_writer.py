"""What a user sees: a metrics file a program can read, TensorBoard events, and progress lines.

`metrics.jsonl` in the work dir gets one JSON object per record (`{"stage", "epoch", ...}`), which
is the source of truth for plots and tables; TensorBoard gets the same scalars.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any
from typing import Mapping

import numpy as np

from jaxreid import distributed


def _plain(value: Any):
  """JSON-safe scalars (numpy / jax values -> python; non-finite floats -> None)."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, 'item') and np.ndim(value) == 0:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricsWriter:
  """Appends records to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self._enabled = distributed.is_primary()  # several processes: process 0 writes
    self._tb = None
    if not self._enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if tensorboard:
      import tensorboardX  # here: it imports PyTorch if installed; only event writers pay that

      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, stage: str, step: int, record: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    record = {'stage': stage, 'step': int(step), 'time': time.time(), **_plain(dict(record))}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for key, value in record.items():
        if key in ('stage', 'step', 'time'):
          continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(f'{stage}/{key}', value, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Progress:
  """Prints `[stage] epoch e/E it i/I ... | it/s | eta` lines; ETA from measured throughput."""

  def __init__(self, stage: str, total_epochs: int, iters_per_epoch: int, start_epoch: int = 0):
    self.stage = stage
    self.total_epochs = total_epochs
    self.iters = iters_per_epoch
    self.start_epoch = start_epoch
    self.t_start = time.time()
    self.epoch_times: list[float] = []

  def epoch_done(self, seconds: float) -> None:
    self.epoch_times.append(seconds)

  def eta(self, epoch: int, fraction_of_epoch: float = 1.0) -> float:
    if not self.epoch_times:
      return float('nan')
    per_epoch = float(np.median(self.epoch_times))
    remaining = self.total_epochs - epoch - fraction_of_epoch
    return per_epoch * max(remaining, 0.0)

  def line(self, epoch: int, it: int, seconds_in_epoch: float, text: str = '') -> str:
    rate = it / seconds_in_epoch if seconds_in_epoch > 0 else float('nan')
    left_in_epoch = (self.iters - it) / rate if rate > 0 else float('nan')
    run_eta = self.eta(epoch, it / self.iters)
    eta = f'epoch eta {format_duration(left_in_epoch)}' if math.isfinite(left_in_epoch) else ''
    if math.isfinite(run_eta):
      eta += f', run eta {format_duration(run_eta)}'
    return (
        f'[{self.stage}] epoch {epoch + 1}/{self.total_epochs} it {it}/{self.iters} '
        f'{text} | {rate:.2f} it/s | {eta}'
    )


class Ticker:
  """`label: done/total (p%) elapsed, eta` lines at every 10% of a long host-driven loop (feature
  passes, decoding), once it has run `min_seconds`: quiet for short work."""

  def __init__(self, label: str, total: int, min_seconds: float = 5.0):
    self.label, self.total, self.min_seconds = label, max(int(total), 1), min_seconds
    self.t0, self.done, self.next_report = time.time(), 0, 0.1

  def tick(self, k: int = 1) -> None:
    self.done += k
    elapsed = time.time() - self.t0
    if self.done / self.total >= self.next_report and elapsed >= self.min_seconds:
      eta = elapsed * (self.total - self.done) / max(self.done, 1)
      log(
          f'{self.label}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) '
          f'{format_duration(elapsed)} elapsed, eta {format_duration(eta)}'
      )
      self.next_report = math.floor(self.done / self.total * 10 + 1) / 10


def log(message: str) -> None:
  if not distributed.is_primary():  # several processes: process 0 speaks for all
    return
  print(message, flush=True)
  sys.stdout.flush()
