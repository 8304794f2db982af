"""Checkpoints: the last two are kept, a damaged newest one falls back to the one before (named
in the log), and with nothing readable the error names the files and the fix."""

import os

import numpy as np
import pytest

from jaxreid import checkpoint as checkpoint_lib


def _state(v):
  return {'w': np.full((3, 4), v, np.float32), 'step': np.array(v, np.int32)}


def _damage(step_dir, how):
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs)
  assert files
  for path in files:
    if how == 'truncate':
      with open(path, 'r+b') as f:
        f.truncate(max(0, os.path.getsize(path) // 3))
    elif how == 'garbage':
      with open(path, 'wb') as f:
        f.write(b'\x00garbage{not json')
    elif how == 'empty':
      open(path, 'wb').close()


@pytest.mark.parametrize('how', ['truncate', 'garbage', 'empty'])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_epoch(tmp_path, how, capsys):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  for epoch in range(3):
    ckpt.save(epoch, _state(epoch), {'epoch': epoch})
  assert sorted(os.listdir(tmp_path / 'checkpoints' / 'latest')) == ['1', '2']  # two kept
  assert not (tmp_path / 'checkpoints' / 'best').exists()  # never created empty
  ckpt.close()
  _damage(tmp_path / 'checkpoints' / 'latest' / '2', how)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  state, meta = ckpt.restore(_state(0))
  assert meta['epoch'] == 1 and float(state['w'][0, 0]) == 1.0
  out = capsys.readouterr().out
  assert 'unreadable, skipped' in out and os.path.join('latest', '2') in out
  ckpt.close()


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
  ckpt.save(0, _state(0), {'epoch': 0})
  ckpt.close()
  _damage(tmp_path / 'checkpoints' / 'latest' / '0', 'truncate')
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  with pytest.raises(checkpoint_lib.CheckpointError, match='Delete .*latest to start'):
    ckpt.restore(_state(0))
  ckpt.close()
