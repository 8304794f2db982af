"""Work-dir bookkeeping: one process at a time, and a rerun must use the run's own config."""

import json
import os
import subprocess
import sys

import pytest

from configs import mmt as mmt_config
from jaxreid import run
from jaxreid import workdir as workdir_lib


def test_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
  with workdir_lib.Lock(str(tmp_path)):
    with pytest.raises(workdir_lib.WorkdirError, match=f'pid {os.getpid()}'):
      with workdir_lib.Lock(str(tmp_path)):
        pass
  assert not (tmp_path / '.lock').exists()  # released


def test_lock_left_by_a_killed_process_is_taken_over(tmp_path):
  dead = subprocess.run(
      [sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True
  ).stdout.strip()
  (tmp_path / '.lock').write_text(dead)
  with workdir_lib.Lock(str(tmp_path)) as lock:
    assert lock.held and (tmp_path / '.lock').read_text() == str(os.getpid())


def test_rerun_with_another_config_is_refused_and_the_work_dir_untouched(tmp_path):
  c = mmt_config.get_config()
  workdir_lib.remember_config(c, str(tmp_path))
  before = (tmp_path / 'config.json').read_text()
  workdir_lib.remember_config(c, str(tmp_path))  # the same config: fine
  changed = mmt_config.get_config()
  changed.train.lr = 1e-3
  changed.train.epochs = c.train.epochs + 3
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.remember_config(changed, str(tmp_path), allow_safe_changes=True)
  assert f'train.lr: {c.train.lr} -> 0.001' in str(e.value) and 'new --workdir' in str(e.value)
  assert (tmp_path / 'config.json').read_text() == before
  # more epochs only: refused without the flag, recorded with it
  longer = mmt_config.get_config()
  more = c.train.epochs + 3
  longer.train.epochs = more
  with pytest.raises(workdir_lib.WorkdirError, match='--allow_safe_changes'):
    workdir_lib.remember_config(longer, str(tmp_path))
  workdir_lib.remember_config(longer, str(tmp_path), allow_safe_changes=True)
  assert json.loads((tmp_path / 'config.json').read_text())['train']['epochs'] == more
  record = json.loads((tmp_path / 'config_changes.jsonl').read_text())
  assert record['changes'] == [f'train.epochs: {c.train.epochs} -> {more}']


def test_a_finished_run_is_reported_not_redone(tmp_path):
  c = mmt_config.get_config()
  workdir_lib.remember_config(c, str(tmp_path))
  stored = {'source only': {'mAP': 1.0, 'top1': 2.0, 'top5': 3.0, 'top10': 4.0}}
  (tmp_path / 'results.json').write_text(json.dumps(stored))
  assert run.train_and_evaluate(c, str(tmp_path)) == stored  # no data is read, nothing trained
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'results.json']


def test_command_line_refusal_is_one_line_with_exit_code_2(tmp_path):
  c = mmt_config.get_config()
  workdir_lib.remember_config(c, str(tmp_path))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'jaxreid.main',
          '--config=configs/mmt.py',
          f'--workdir={tmp_path}',
          '--config.model.width=32',
      ],
      cwd=repo,
      capture_output=True,
      text=True,
  )
  assert r.returncode == 2
  assert 'Traceback' not in r.stderr and 'model.width: 16 -> 32' in r.stderr


@pytest.mark.parametrize(
    'override, key',
    [
        (('pretrain', 'epochs', -1), 'pretrain.epochs'),
        (('train', 'epochs', -1), 'train.epochs'),
        (('data', 'num_instances', 0), 'data.num_instances'),
        (('cluster', 'num_clusters', 0), 'cluster.num_clusters'),
        (('train', 'lr', 0.0), 'train.lr'),
        (('train', 'ema_decay', 1.0), 'train.ema_decay'),
    ],
)
def test_out_of_range_fields_fail_before_any_work_naming_the_key(override, key, tmp_path):
  c = mmt_config.get_config()
  section, name, value = override
  c[section][name] = value
  with pytest.raises(ValueError, match=f'^config.{key}: '):
    run.train_and_evaluate(c, str(tmp_path / 'w'))
  assert not (tmp_path / 'w' / 'config.json').exists()


def test_config_path_works_from_any_directory(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'jaxreid.main',
          f'--config={os.path.join(repo, "configs", "cuhk2pku.py")}:mmt,dbscan',
          '--config.train.lr=-1',
          f'--workdir={tmp_path / "w"}',
      ],
      cwd=str(tmp_path),
      capture_output=True,
      text=True,
  )
  assert r.returncode == 2 and 'config.train.lr' in r.stderr, r.stderr[-2000:]


TINY = [
    '--config.data.synthetic.num_train_ids=12',
    '--config.data.synthetic.num_test_ids=6',
    '--config.data.synthetic.min_images=4',
    '--config.data.synthetic.max_images=6',
    '--config.data.height=32',
    '--config.data.width=16',
    '--config.data.batch_size=16',
    '--config.data.eval_batch_size=64',
    '--config.model.depth=18',
    '--config.model.width=8',
    '--config.pretrain.epochs=1',
    '--config.pretrain.iters=2',
    '--config.pretrain.warmup_epochs=1',
    '--config.pretrain.milestones=(5,)',
    '--config.pretrain.eval_every=0',
    '--config.train.epochs=2',
    '--config.train.iters=4',
    '--config.train.log_every=1',
    '--config.train.eval_every=1',
    '--config.cluster.num_clusters=6',
]


def _main(workdir, env, kill_after_line=None, delay=0.0):
  """Runs jaxreid.main on the tiny world; with `kill_after_line`, SIGKILLs it `delay` seconds
  after the first output line containing that text. Returns (exit code, output)."""
  import signal
  import time

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(
      [sys.executable, '-m', 'jaxreid.main', '--config=configs/mmt.py', f'--workdir={workdir}']
      + TINY,
      cwd=repo,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  out = []
  for line in proc.stdout:
    out.append(line)
    if kill_after_line and kill_after_line in line:
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait()
  return proc.returncode, ''.join(out)


# Kill points in the order a run reaches them; one work dir is killed at each in turn (every rerun
# resumes from what the previous kill left) and then run to the end.
KILL_POINTS = [
    ('[pretrain seed 2]', 0.0),  # inside pre-training of the second source model
    ('[mmt] epoch 1/2 it 2/4', 0.0),  # inside an adaptation epoch
    ('[mmt] epoch 1/2 loss', 0.0),  # between epochs
    ('[mmt] epoch 2/2 it 4/4', 0.3),  # at the last epoch's end: evaluation, checkpoint, export
]


def test_kill_minus_9_anywhere_then_rerun_gives_the_uninterrupted_result(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  env = dict(os.environ, JAXREID_DATA_CACHE=str(base / 'world'))
  reference = base / 'uninterrupted'
  rc, out = _main(reference, env)
  assert rc == 0, out[-3000:]
  workdir = tmp_path_factory.mktemp('killed')
  for line, delay in KILL_POINTS:
    rc, out = _main(workdir, env, kill_after_line=line, delay=delay)
    assert rc == -9, f'the line {line!r} never came:\n{out[-3000:]}'
    assert not (workdir / 'results.json').exists(), line
  rc, out = _main(workdir, env)
  assert rc == 0, out[-3000:]
  got = json.loads((workdir / 'results.json').read_text())
  want = json.loads((reference / 'results.json').read_text())
  for row in want:
    for k in ('mAP', 'top1', 'top5', 'top10'):
      assert got[row][k] == pytest.approx(want[row][k], abs=1e-6), (row, k)


def test_a_second_process_on_a_busy_work_dir_exits_at_once(tmp_path_factory):
  import time

  base = tmp_path_factory.getbasetemp()
  env = dict(os.environ, JAXREID_DATA_CACHE=str(base / 'world'))
  workdir = tmp_path_factory.mktemp('busy')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  first = subprocess.Popen(
      [sys.executable, '-m', 'jaxreid.main', '--config=configs/mmt.py', f'--workdir={workdir}']
      + TINY,
      cwd=repo,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  try:
    for _ in range(600):
      if (workdir / '.lock').exists():
        break
      time.sleep(0.1)
    second = subprocess.run(
        [sys.executable, '-m', 'jaxreid.main', '--config=configs/mmt.py', f'--workdir={workdir}']
        + TINY,
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2, second.stderr[-2000:]
    assert f'in use by another jaxreid process (pid {first.pid})' in second.stderr
    assert 'Traceback' not in second.stderr
  finally:
    first.kill()
    first.wait()


def test_a_run_in_which_no_epoch_was_evaluated_still_finishes_cleanly(world_cache, tmp_path):
  from configs import abmt as abmt_config

  c = abmt_config.get_config()
  c.data.synthetic.update(dict(num_train_ids=12, num_test_ids=6, min_images=4, max_images=6))
  c.data.update(dict(height=32, width=16, batch_size=16, eval_batch_size=64))
  c.model.update(dict(depth=18, width=8))
  c.pretrain.update(dict(epochs=1, iters=2, warmup_epochs=1, milestones=(5,), eval_every=0))
  c.train.update(dict(epochs=2, iters=2, eval_every=1))
  c.cluster.min_samples = 10_000  # no core point: DBSCAN finds no cluster, every epoch skipped
  summary = run.train_and_evaluate(c, str(tmp_path / 'w'))
  assert 'mAP' in summary['source only'] and 'mAP' not in summary['abmt (adapted)']
  stored = json.loads((tmp_path / 'w' / 'results.json').read_text())
  assert stored['abmt (adapted)'] == {'selection': 'last epoch'}


@pytest.fixture()
def world_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXREID_DATA_CACHE', str(tmp_path / 'world'))
