"""The work dir's own bookkeeping: one process at a time (a lock file), and the config it was
started with (a rerun with another config is refused, listing what changed, so a resumed run can
never mix two configs and `config.json` always describes the weights next to it)."""

from __future__ import annotations

import json
import os

# Keys a rerun may change with `--allow_safe_changes`: they extend or re-report a run without
# changing what its finished epochs computed.
SAFE_CHANGES = (
    'train.epochs',
    'train.eval_every',
    'train.log_every',
    'train.coupling',
    'pretrain.eval_every',
    'data.eval_batch_size',
    'eval.rerank',
)


class WorkdirError(RuntimeError):
  """The work dir cannot be used as asked; the message says why and what to do."""


def _flatten(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def config_changes(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every field that differs (JSON-level comparison)."""
  a, b = _flatten(old), _flatten(new)
  return [
      f'{k}: {a.get(k, "(absent)")!r} -> {b.get(k, "(absent)")!r}'
      for k in sorted(set(a) | set(b))
      if a.get(k) != b.get(k)
  ]


def read_config(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(
        f"{path} is unreadable ({e}); it describes this work dir's run: "
        'restore it, or start again with a new --workdir'
    ) from None


def remember_config(config, workdir: str, *, allow_safe_changes: bool = False) -> None:
  """Writes `config.json` on the first run; on a rerun compares and refuses any change (safe ones
  only with `allow_safe_changes`, recorded in `config_changes.jsonl`)."""
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    previous = read_config(path)
    changes = config_changes(previous, current)
    if not changes:
      return
    keys = [c.split(':', 1)[0] for c in changes]
    unsafe = [c for c, k in zip(changes, keys) if k not in SAFE_CHANGES]
    listing = '\n  '.join(changes)
    if unsafe or not allow_safe_changes:
      how = (
          'use a new --workdir for a different experiment'
          if unsafe
          else 'these keys only extend or re-report the run: rerun with --allow_safe_changes, or '
          'use a new --workdir'
      )
      raise WorkdirError(
          f'{workdir} holds a run with another config; changed:\n  {listing}\n'
          f'Nothing was changed in the work dir. To proceed: {how}.'
      )
    with open(os.path.join(workdir, 'config_changes.jsonl'), 'a') as f:
      f.write(json.dumps({'changes': changes}) + '\n')
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, path)


class Lock:
  """`<workdir>/.lock` holding the owner's pid; a second process exits at once. A lock left by a
  process that no longer runs (killed with -9) is taken over."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, '.lock')
    self.held = False

  def __enter__(self):
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        pid = self._owner()
        if pid is not None and _alive(pid):
          raise WorkdirError(
              f'{os.path.dirname(self.path)} is in use by another jaxreid process '
              f'(pid {pid}); wait for it to finish or use another --workdir'
          )
        os.remove(self.path)  # stale: its process is gone
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(str(os.getpid()))
      self.held = True
      return self
    raise WorkdirError(f'cannot take the lock {self.path}')

  def _owner(self) -> int | None:
    try:
      with open(self.path) as f:
        return int(f.read().strip() or -1)
    except (OSError, ValueError):
      return None

  def __exit__(self, *exc):
    if self.held and self._owner() == os.getpid():
      os.remove(self.path)
    self.held = False


def _alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
