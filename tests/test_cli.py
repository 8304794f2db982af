"""One command-line convention for every console script: underscore flag names, `--model` read and
`--out` written, `--help` = the tool's docstring then its flags, and every bad input one line
`error: ...` on stderr with exit status 2 and no traceback (`--verbose`: the traceback).

The bad inputs run as subprocesses (what a user sees, tracebacks included); each one that loads
a model imports JAX (a few seconds), so the matrix has one case per tool and kind of input."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

from absl import flags
import pytest

from jaxreid.tools import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_WEIGHTS = os.environ.get(
    'JAXREID_SHARED_WEIGHTS', os.path.join(REPO, '..', 'shared', 'weights')
)
OSNET_MSMT = os.path.join(SHARED_WEIGHTS, 'osnet_x0_25_msmt17.pth')  # torchreid, 1041 classes
needs_osnet = pytest.mark.skipif(not os.path.isfile(OSNET_MSMT), reason=f'no {OSNET_MSMT}')
# Tools on their own FlagValues (main(argv) in this process) and those on absl's global FLAGS.
OWN_FLAGS = ('evaluate', 'search', 'convert', 'export', 'plots', 'model_report', 'compare')


def _run(module, *args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', module, *args],
      capture_output=True,
      text=True,
      cwd=cwd,
      env=env,
      timeout=300,
  )


def _assert_one_line_error(proc, *expected):
  assert 'Traceback' not in proc.stdout + proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  assert proc.returncode == 2, proc.stderr
  for text in expected:
    assert text in lines[0]
  return lines[0]


@pytest.fixture(scope='module')
def bad(tmp_path_factory):
  """Bad inputs: a text file named .pth, a run whose weights are of another network than its
  config.json says, a config file that raises, a file where a folder is needed."""
  from jaxreid import checkpoint
  from jaxreid import models
  from jaxreid import numpy_init

  root = tmp_path_factory.mktemp('bad')
  (root / 'text.pth').write_text('not a checkpoint\n')
  run = root / 'other_run'
  run.mkdir()
  net = models.create_model(dict(arch='resnet', depth=18, width=4, num_classes=4))
  checkpoint.save_weights(str(run / 'model.msgpack'), numpy_init.init_variables(net, 0))
  config = {'model': {'arch': 'abmt', 'depth': 18, 'width': 4}, 'data': {'height': 32, 'width': 16}}
  (run / 'config.json').write_text(json.dumps(config))
  (root / 'raising_config.py').write_text(
      'def get_config(arg=None):\n  raise RuntimeError("no such experiment here")\n'
  )
  (root / 'elsewhere').mkdir()
  return dict(
      root=str(root),
      missing=str(root / 'missing.pth'),
      text=str(root / 'text.pth'),
      other=str(run),
      msgpack=str(run / 'model.msgpack'),
      config=str(root / 'raising_config.py'),
      elsewhere=str(root / 'elsewhere'),
  )


CONFIGS_LISTED = ('duke2market.py', 'folder.py', 'msmt2market.py', 'mmt.py')
METHODS_LISTED = ('cluster_baseline', 'mean_teacher', 'mmt', 'abmt')
CASES = {
    # jaxreid-train (= python -m jaxreid.main)
    'train-no-config': ('jaxreid.tools.train', [], ['required: --config']),
    'train-config-key-typo': (
        'jaxreid.main',
        ['--config=configs/mmt.py', '--config.train.epohcs=3'],
        ['config.train.epohcs', 'did you mean config.train.epochs?'],
    ),
    'train-unknown-task': (
        'jaxreid.tools.train',
        ['--config=configs/msmt2markt.py'],
        ['msmt2markt.py', *CONFIGS_LISTED],
    ),
    'train-unknown-method': (
        'jaxreid.tools.train',
        ['--config=configs/msmt2market.py:abmtt'],
        ["'abmtt'", *METHODS_LISTED],
    ),
    'train-config-raises': (
        'jaxreid.main',
        ['--config={config}'],
        ['raising_config.py', 'RuntimeError: no such experiment here'],
    ),
    'train-unknown-flag': ('jaxreid.main', ['--config=configs/mmt.py', '--epochs=3'], ['epochs']),
    'train-bad-value': (
        'jaxreid.main',
        ['--config=configs/mmt.py', '--config.train.epochs=many'],
        ['config.train.epochs'],
    ),
    # jaxreid-benchmark
    'benchmark-unknown-backbone': (
        'jaxreid.tools.benchmark',
        ['--backbone=osnet'],
        ['--backbone=osnet', 'osnet_x0_25', 'mobilenetv2'],
    ),
    'benchmark-bad-value': ('jaxreid.tools.benchmark', ['--steps=few'], ['--steps']),
    # jaxreid-convert
    'convert-missing-file': (
        'jaxreid.tools.convert',
        ['--model={missing}', '--out=x'],
        ['missing'],
    ),
    'convert-text-file': ('jaxreid.tools.convert', ['--model={text}', '--out=x'], ['text.pth']),
    'convert-msgpack': (
        'jaxreid.tools.convert',
        ['--model={msgpack}', '--out=x'],
        ['not a PyTorch checkpoint', 'needs no conversion'],
    ),
    'convert-no-out': ('jaxreid.tools.convert', ['--model={text}'], ['required: --out']),
    # jaxreid-evaluate, jaxreid-search, jaxreid-export: a missing file, a text file, weights of
    # another network than the run's config.json says
    **{
        f'{tool}-{kind}': (
            f'jaxreid.tools.{tool}',
            [f'--model={{{kind}}}', *args],
            [what],
        )
        for tool, args in (
            ('evaluate', ['--data=market1501']),
            ('search', ['--query={root}', '--gallery={root}']),
            ('export', ['--format=torchreid', '--out={root}/x.pth']),
        )
        for kind, what in (
            ('missing', 'does not exist'),
            ('text', 'cannot read weights'),
            ('other', 'do not fit'),
        )
    },
    # jaxreid-plots: a missing work dir, with a comparison (which failed too: reported once)
    'plots-missing-workdir': (
        'jaxreid.tools.plots',
        ['{root}/no_run', '--compare={root}/compare.png'],
        ['no_run'],
    ),
    'model_report-bad-value': ('jaxreid.tools.model_report', ['--height=tall'], ['--height']),
    # jaxreid-compare: checked before any run (nothing is written)
    'compare-one-variant': (
        'jaxreid.tools.compare',
        ['--config=configs/mmt.py', '--out={root}/cmp', '--variant=baseline'],
        ['at least 2'],
    ),
    'compare-same-name': (
        'jaxreid.tools.compare',
        [
            '--config=configs/mmt.py',
            '--out={root}/cmp',
            '--variant=a',
            '--variant=a=--config.seed=2',
        ],
        ['a is used twice'],
    ),
    'compare-bad-seeds': (
        'jaxreid.tools.compare',
        [
            '--config=configs/mmt.py',
            '--out={root}/cmp',
            '--variant=a',
            '--variant=b',
            '--seeds=1,x',
        ],
        ['--seeds=1,x'],
    ),
    'compare-missing-config': (
        'jaxreid.tools.compare',
        ['--out={root}/cmp', '--variant=a', '--variant=b=--config=configs/mmtt.py'],
        ['variant a has no config'],
    ),
    'compare-unknown-config': (
        'jaxreid.tools.compare',
        ['--config=configs/mmtt.py', '--out={root}/cmp', '--variant=a', '--variant=b'],
        ['configs/mmtt.py not found', 'mmt.py'],
    ),
    'compare-config-key-typo': (
        'jaxreid.tools.compare',
        [
            '--config=configs/mmt.py',
            '--out={root}/cmp',
            '--variant=a',
            '--variant=b=--config.loss.tri=0 --config.loss.sofft_tri=0',
        ],
        ['variant b', 'config.loss.sofft_tri'],
    ),
    'compare-no-out': (
        'jaxreid.tools.compare',
        ['--variant=a', '--variant=b'],
        ['required: --out'],
    ),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, bad):
  module, args, expected = CASES[case]
  proc = _run(module, *[a.format(**bad) for a in args])
  _assert_one_line_error(proc, *expected)


@needs_osnet
@pytest.mark.parametrize(
    'args, expected',
    [
        # weights of another network than asked for
        (['--backbone=mobilenetv2', '--out={root}/x.msgpack'], ['needs backbone']),
        # a file where the output's folder should be
        (['--out={text}/x.msgpack'], ['cannot write', 'text.pth']),
    ],
)
def test_convert_bad_architecture_or_output(args, expected, bad):
  proc = _run('jaxreid.tools.convert', f'--model={OSNET_MSMT}', *[a.format(**bad) for a in args])
  _assert_one_line_error(proc, *expected)


def test_config_path_is_found_from_the_repository_anywhere(bad):
  # From another folder `configs/mmt.py` is the repository's: the error is about the key in it.
  proc = _run(
      'jaxreid.main',
      '--config=configs/mmt.py',
      '--config.train.epohcs=3',
      cwd=bad['elsewhere'],
  )
  _assert_one_line_error(proc, 'did you mean config.train.epochs?')
  # A config found in neither place names both.
  proc = _run('jaxreid.tools.train', '--config=configs/nope.py', cwd=bad['elsewhere'])
  _assert_one_line_error(
      proc,
      os.path.join(bad['elsewhere'], 'configs', 'nope.py'),
      os.path.join(REPO, 'configs', 'nope.py'),
  )


def test_verbose_shows_the_traceback():
  proc = _run('jaxreid.main', '--config=configs/msmt2market.py:abmtt', '--verbose')
  assert proc.returncode not in (0, 2)
  assert 'Traceback' in proc.stderr and 'abmtt' in proc.stderr


def test_verbose_in_process(bad):
  from jaxreid.tools import convert

  with pytest.raises(common.UsageError, match='not a PyTorch checkpoint'):
    convert.main([f'--model={bad["text"]}', '--out=x', '--verbose'])


@needs_osnet
def test_convert_reads_the_architecture_off_a_torchreid_file_and_creates_the_folder(tmp_path):
  out = tmp_path / 'new' / 'nested' / 'osnet.msgpack'
  proc = _run('jaxreid.tools.convert', f'--model={OSNET_MSMT}', f'--out={out}')
  assert proc.returncode == 0, proc.stderr
  assert 'backbone=osnet_x0_25, num_classes=1041' in proc.stdout
  from jaxreid import checkpoint

  classifier = checkpoint.read_weights(str(out))['params']['classifier']['kernel']
  assert classifier.shape == (512, 1041)  # the checkpoint's classifier, all of it


def _help_doc(tool):
  """The docstring `--help` starts with: the module that defines the tool's flags."""
  module = {'train': 'jaxreid.main'}.get(tool)
  return importlib.import_module(module or f'jaxreid.tools.{tool}').__doc__.strip()


@pytest.mark.parametrize('tool', OWN_FLAGS)
def test_help_is_the_docstring_then_the_flags(tool, capsys):
  main = importlib.import_module(f'jaxreid.tools.{tool}').main
  assert main(['--help']) == 0
  out = capsys.readouterr().out
  assert out.startswith(_help_doc(tool) + '\n\nflags:\n')
  assert '--[no]verbose: ' in out and 'Alias' not in out


@pytest.mark.parametrize('tool', ['train', 'benchmark'])
def test_help_of_the_absl_programs_has_the_same_layout(tool):
  proc = _run(f'jaxreid.tools.{tool}', '--help')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(_help_doc(tool) + '\n\nflags:\n')
  listed = [l.split(':')[0].strip() for l in proc.stdout.split('\n\nflags:\n')[1].splitlines()]
  listed = [f for f in listed if f.startswith('--')]
  assert listed[-1] == '--[no]verbose' and '--keep_host_memory' in listed
  assert not any(f in listed for f in ('--logtostderr', '--verbosity', '--json'))  # absl's
  if tool == 'train':
    assert '--config' in listed and '--workdir' in listed
    assert _run('jaxreid.main', '-h').stdout == proc.stdout


def test_flag_names_use_underscores_and_the_old_spellings_still_parse():
  from jaxreid import main  # noqa: F401 - defines its flags on absl's FLAGS
  from jaxreid.tools import benchmark  # noqa: F401

  tools = [importlib.import_module(f'jaxreid.tools.{t}') for t in OWN_FLAGS]
  for fv in [t.FLAGS for t in tools] + [flags.FLAGS]:
    for name in fv:
      assert '-' not in name or fv[name].help.startswith('Alias for --'), name
  from jaxreid.tools import convert

  old = ['--input=a.pth', '--output=b', '--num-classes=3', '--stem-relu=true', '--last-stride=2']
  common.parse(convert.FLAGS, old, takes_args=False)
  f = convert.FLAGS
  assert (f.model, f.out, f.num_classes, f.stem_relu, f.last_stride) == ('a.pth', 'b', 3, 'true', 2)
