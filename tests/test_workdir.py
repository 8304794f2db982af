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
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True).stdout.strip()
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
  changed.train.epochs = 9
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.remember_config(changed, str(tmp_path), allow_safe_changes=True)
  assert 'train.lr: 0.00035 -> 0.001' in str(e.value) and 'new --workdir' in str(e.value)
  assert (tmp_path / 'config.json').read_text() == before
  # more epochs only: refused without the flag, recorded with it
  longer = mmt_config.get_config()
  longer.train.epochs = 9
  with pytest.raises(workdir_lib.WorkdirError, match='--allow_safe_changes'):
    workdir_lib.remember_config(longer, str(tmp_path))
  workdir_lib.remember_config(longer, str(tmp_path), allow_safe_changes=True)
  assert json.loads((tmp_path / 'config.json').read_text())['train']['epochs'] == 9
  record = json.loads((tmp_path / 'config_changes.jsonl').read_text())
  assert record['changes'] == ['train.epochs: 6 -> 9']


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
  r = subprocess.run([sys.executable, '-m', 'jaxreid.main', '--config=configs/mmt.py',
                      f'--workdir={tmp_path}', '--config.model.width=32'],
                     cwd=repo, capture_output=True, text=True)
  assert r.returncode == 2
  assert 'Traceback' not in r.stderr and 'model.width: 16 -> 32' in r.stderr


@pytest.mark.parametrize('override, key', [
    (('pretrain', 'epochs', -1), 'pretrain.epochs'),
    (('train', 'epochs', -1), 'train.epochs'),
    (('data', 'num_instances', 0), 'data.num_instances'),
    (('cluster', 'num_clusters', 0), 'cluster.num_clusters'),
    (('train', 'lr', 0.0), 'train.lr'),
    (('train', 'ema_decay', 1.0), 'train.ema_decay'),
])
def test_out_of_range_fields_fail_before_any_work_naming_the_key(override, key, tmp_path):
  c = mmt_config.get_config()
  section, name, value = override
  c[section][name] = value
  with pytest.raises(ValueError, match=f'^config.{key}: '):
    run.train_and_evaluate(c, str(tmp_path / 'w'))
  assert not (tmp_path / 'w' / 'config.json').exists()
