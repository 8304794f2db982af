"""Checkpoints: the last two are kept, a damaged newest one falls back to the one before (named
in the log), and with nothing readable the error names the files and the fix. The weight file:
a msgpack round trip, checked path by path and shape by shape against a model."""

import os

import jax
import numpy as np
import pytest

from jaxreid import checkpoint as checkpoint_lib
from jaxreid import convert
from jaxreid import models
from jaxreid import numpy_init


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


def test_weights_round_trip_and_are_checked_against_the_model(tmp_path):
  model = models.create_model(depth=18, width=4, num_classes=5)
  variables = numpy_init.init_variables(model, 1)
  path = str(tmp_path / 'model.msgpack')
  checkpoint_lib.save_weights(path, variables)
  assert open(path, 'rb').read(1) == b'\x82'  # a msgpack map {params, batch_stats}, not a pickle
  assert os.listdir(tmp_path) == ['model.msgpack']  # no temporary file left
  for loaded in (
      checkpoint_lib.read_weights(path),
      checkpoint_lib.read_weights(path, model),
      checkpoint_lib.load_weights(path, model),
  ):
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
      np.testing.assert_array_equal(a, b)
  wider = models.create_model(depth=18, width=4, num_classes=9)
  with pytest.raises(convert.ConversionError, match=r'mis-shaped[\s\S]*classifier'):
    checkpoint_lib.read_weights(path, wider)
  checkpoint_lib.load_weights(path, wider, drop_classifier=True)  # the width is not checked
  with pytest.raises(
      convert.ConversionError, match=r'config.init.x=[\s\S]*missing[\s\S]*avg_branch'
  ):
    checkpoint_lib.load_weights(
        path, models.create_model(arch='abmt', depth=18, width=4), key='config.init.x'
    )


def test_weights_that_are_not_weights_fail_in_one_line(tmp_path):
  text = tmp_path / 'notes.msgpack'
  text.write_text('hello')
  with pytest.raises(convert.ConversionError, match='not a jaxreid .msgpack'):
    checkpoint_lib.read_weights(str(text))
  with pytest.raises(convert.ConversionError, match='does not exist'):
    checkpoint_lib.load_weights(str(tmp_path / 'missing.msgpack'), None)
