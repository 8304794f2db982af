"""Several processes as one run (jax.distributed over CPU gloo collectives on localhost): two
processes of one device each must end where one process ends: the same pseudo labels every
epoch, the same evaluation and the same adapted parameters (to float32 reduction order)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxreid import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    'data.synthetic.num_train_ids': 12,
    'data.synthetic.num_test_ids': 6,
    'data.synthetic.min_images': 4,
    'data.synthetic.max_images': 6,
    'data.height': 32,
    'data.width': 16,
    'data.batch_size': 16,
    'data.eval_batch_size': 64,
    'model.depth': 18,
    'model.width': 8,
    'pretrain.epochs': 1,
    'pretrain.iters': 2,
    'pretrain.warmup_epochs': 1,
    'pretrain.milestones': '(5,)',
    'pretrain.eval_every': 0,
    'train.epochs': 2,
    'train.iters': 2,
    'train.eval_every': 1,
    'cluster.num_clusters': 6,
}


def command(workdir, *extra):
  return [
      sys.executable,
      '-m',
      'jaxreid.main',
      '--config=configs/mmt.py',
      f'--workdir={workdir}',
      '--compilation_cache=',
      *[f'--config.{k}={v}' for k, v in TINY.items()],
      *extra,
  ]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def adaptation_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['stage'] == 'mmt' and r['step'] > 0]


def test_two_processes_equal_one(tmp_path):
  env = dict(os.environ, JAXREID_DATA_CACHE=str(tmp_path / 'cache'))
  env.pop('XLA_FLAGS', None)  # one device per process
  run = lambda cmd: subprocess.Popen(
      cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  one = run(command(tmp_path / 'one'))
  out = one.communicate(timeout=900)[0]
  assert one.returncode == 0, out[-3000:]

  address = f'localhost:{free_port()}'
  procs = [
      run(
          command(
              tmp_path / 'two',
              f'--coordinator_address={address}',
              '--num_processes=2',
              f'--process_id={i}',
          )
      )
      for i in (1, 0)
  ]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), '\n'.join(o[-3000:] for o in outs)
  secondary, primary = outs
  assert '[setup] 2 device(s)' in primary and '[mmt] epoch 2/2' in primary
  assert '[mmt]' not in secondary  # process 0 speaks (and writes) for both

  # Same clustering every epoch (labels: every statistic against the true ids), same results.
  keys = ('cluster/num_clusters', 'cluster/purity', 'cluster/nmi', 'cluster/ari')
  for a, b in zip(adaptation_records(tmp_path / 'one'), adaptation_records(tmp_path / 'two')):
    assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], abs=1e-9)
    assert a['mAP'] == pytest.approx(b['mAP'], abs=1e-3)
    assert a['loss/total'] == pytest.approx(b['loss/total'], rel=1e-4)
  # The same adapted model.
  w1 = checkpoint.read_weights(str(tmp_path / 'one' / 'model.msgpack'))
  w2 = checkpoint.read_weights(str(tmp_path / 'two' / 'model.msgpack'))
  for x, y in zip(jax.tree.leaves(w1), jax.tree.leaves(w2)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
