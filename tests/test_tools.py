"""The command-line tools (`jaxreid.tools`): every console script in pyproject.toml resolves to a
callable, every tool prints its usage with `--help` (exit status 0), and a bad command line is one
line `error: ...` with exit status 2, whichever tool. What each tool computes is tested with its
library module (test_evaluate.py, test_search.py, test_convert.py, test_plots.py, ...)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib

import pytest

from jaxreid.tools import common
from jaxreid.tools import inference_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as _f:
  SCRIPTS = tomllib.load(_f)['project']['scripts']
# Tools on their own FlagValues: main(argv) -> exit status, callable in this process.
TOOLS = {
    'evaluate': ('--data', '--rerank', '--arch', '--img_width'),
    'search': ('--query', '--gallery', '--topk', '--backbone'),
    'convert': ('--model', '--out', '--num_classes', '--stem_relu'),
    'export': ('--model', '--format', '--branch'),
    'plots': ('--compare', '--labels'),
    'model_report': ('--height', '--num_classes'),
}


def test_every_console_script_resolves_to_a_callable():
  assert {'jaxreid-train', 'jaxreid-evaluate', 'jaxreid-search', 'jaxreid-convert'} <= set(SCRIPTS)
  assert {'jaxreid-export', 'jaxreid-plots', 'jaxreid-benchmark'} <= set(SCRIPTS)
  for name, target in SCRIPTS.items():
    module, _, attr = target.partition(':')
    assert module.startswith('jaxreid.tools.'), name  # all entry points in one place
    assert callable(getattr(importlib.import_module(module), attr)), name
  tools = {t.split(':')[0].rsplit('.', 1)[1] for t in SCRIPTS.values()}
  assert set(TOOLS) <= tools


@pytest.mark.parametrize('tool', sorted(TOOLS))
def test_help_lists_the_flags_and_exits_0(tool, capsys):
  module = importlib.import_module(f'jaxreid.tools.{tool}')
  main = module.main
  assert main(['--help']) == 0
  out = capsys.readouterr().out
  assert out.startswith(module.__doc__.split('\n')[0])
  assert '\nflags:\n' in out
  for flag in TOOLS[tool]:
    assert f'  {flag}: ' in out or f'  --[no]{flag[2:]}: ' in out, flag
  assert main(['-h']) == 0 and capsys.readouterr().out == out


def test_model_flags_are_grouped_and_required_flags_marked(capsys):
  from jaxreid.tools import evaluate

  evaluate.main(['--help'])
  out = capsys.readouterr().out
  own, overrides = out.split('\nflags:\n')[1].split(f'\n{common.MODEL_GROUP}:\n')
  assert '--data_root' in own and '--arch' not in own
  assert '--[no]ibn' in overrides and '--height' in overrides
  assert '--model: ' in own and '(required)' in own.split('--model: ')[1].split('\n  --')[0]


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--data=market1501'], 'the following flags are required: --model'),
        (['--model=m', '--data=d', '--batch_size=0'], 'flag --batch_size=0: 0 is not a positive'),
        (['--model=m', '--data=d', '--arch=vgg'], 'flag --arch=vgg: value should be one of'),
        (['--model=m', '--data=d', '--no_such_flag'], "Unknown command line flag 'no_such_flag'"),
        (['--model=m', '--data=d', 'extra'], 'unexpected arguments: extra'),
    ],
)
def test_bad_command_lines_are_one_line_and_exit_2(argv, message, capsys):
  from jaxreid.tools import evaluate

  assert evaluate.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.startswith(f'error: {message}') and captured.err.count('\n') == 1


def test_flags_start_from_the_defaults_on_every_call_and_take_argparse_spellings():
  from jaxreid.tools import search

  seen = []
  argv = ['--model', 'm', '--query=q', '--gallery=g']

  def main():
    seen.append(inference_flags.model_overrides(search.FLAGS) | {'topk': search.FLAGS.topk})
    return 0

  assert common.run(main, search.FLAGS, argv + ['--topk=3', '--no-ibn'], doc='') == 0
  assert common.run(main, search.FLAGS, argv + ['--ibn'], doc='') == 0
  assert common.run(main, search.FLAGS, argv, doc='') == 0
  assert [(s['ibn'], s['topk'], s['arch']) for s in seen] == [
      (False, 3, None),
      (True, 10, None),
      (None, 10, None),
  ]


def test_positional_arguments(capsys):
  from jaxreid.tools import plots

  assert plots.main(['--compare=x.png']) == 2
  assert 'the following arguments are required: WORKDIR' in capsys.readouterr().err


def _run(*args):
  return subprocess.run(
      [sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120
  )


def test_documented_module_commands_and_absl_entry_points_give_help():
  r = _run('-m', 'jaxreid.tools.evaluate', '--help')
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith('Evaluate a trained model') and '--data_root' in r.stdout
  # jaxreid-train: the flags of jaxreid.main (not of the console script's launcher), status 0
  code = 'import sys; sys.argv[0] = "jaxreid-train"; from jaxreid.tools import train; train.main()'
  r = _run('-c', code, '--help')
  assert r.returncode == 0, r.stderr
  assert '--config: ' in r.stdout and '--workdir: ' in r.stdout
