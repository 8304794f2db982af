"""The config files: each is a whole experiment that loads for every method it offers, names its
own command, imports nothing from jaxreid, and names exactly the loss weights its method knows."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest

from configs import base
from jaxreid import config_checks
from jaxreid import methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(REPO, 'configs'))
    if f.endswith('.py') and f != 'base.py'
)
CONFIGS.remove('__init__')
METHOD_CONFIGS = [c for c in CONFIGS if c in base.METHODS]
TASK_CONFIGS = [c for c in CONFIGS if c not in base.METHODS]


def test_every_method_names_the_loss_weights_it_accepts():
  assert set(base.LOSS_WEIGHTS) == set(methods.METHODS) == set(base.METHODS)
  for name, method in methods.METHODS.items():
    assert sorted(base.LOSS_WEIGHTS[name]) == sorted(method.weights), name
    assert all(base.get_config(name).loss[w] is None for w in method.weights)  # defaults apply


@pytest.mark.parametrize('name', CONFIGS)
def test_each_config_states_its_command(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'--config=configs/{name}.py' in module.__doc__


@pytest.mark.parametrize('name', TASK_CONFIGS)
def test_each_task_runs_every_method_and_checks_out(name, tmp_path):
  module = importlib.import_module(f'configs.{name}')
  for method in base.METHODS:
    c = module.get_config(method)
    assert c.method == method
    if c.data.target == 'folder':
      c.data.target_root = str(tmp_path)
      if c.cluster.method == 'kmeans':
        c.cluster.num_clusters = 10
    config_checks.validate_config(c)
  with pytest.raises(ValueError, match=r"'abmtt'.*mmt"):
    module.get_config('abmtt')


@pytest.mark.parametrize('name', METHOD_CONFIGS)
def test_each_method_config_is_the_synthetic_default(name):
  c = importlib.import_module(f'configs.{name}').get_config()
  assert (c.method, c.data.source, c.data.target) == (name, 'synthetic_a', 'synthetic_b')
  config_checks.validate_config(c)
  with pytest.raises(ValueError, match='msmt2market'):  # a task is a file of its own now
    importlib.import_module(f'configs.{name}').get_config('msmt2market')


def test_configs_import_nothing_from_jaxreid():
  code = (
      'import importlib, sys\n'
      f'for name in {CONFIGS!r}:\n'
      '  importlib.import_module("configs." + name).get_config()\n'
      'print(sorted(m for m in sys.modules if m.split(".")[0] == "jaxreid"))\n'
  )
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]'


@pytest.mark.parametrize(
    'backbone, head, error',
    [
        ('osnet_x0_25', 'fc_pre_bn', None),
        ('osnet_x0_25', 'bnneck', None),
        ('resnet', 'bnneck', None),
        ('resnet', 'fc_pre_bn', "config.model.head: 'fc_pre_bn' reads OSNet's fc block"),
        ('mobilenetv2', 'fc_pre_bn', "config.model.head: 'fc_pre_bn' reads OSNet's fc block"),
        ('osnet_x0_25', 'pre_bn', "config.model.head: 'pre_bn' is not one of"),
    ],
)
def test_the_head_field_is_checked_before_any_work(backbone, head, error):
  c = base.get_config('mmt')
  c.model.backbone, c.model.head = backbone, head
  if error is None:
    config_checks.validate_config(c)
  else:
    with pytest.raises(config_checks.ConfigError, match=re.escape(error)):
      config_checks.validate_config(c)
