"""jaxreid-compare: the statistics against values worked out by hand, and one comparison end to
end on a tiny synthetic task (a copy of the baseline is within the seed noise, a broken loss is
worse beyond it), rerun (nothing is trained again), dry-run and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import time

from PIL import Image
import pytest

from jaxreid import compare
from jaxreid import plots
from jaxreid.tools import compare as compare_tool

# The tiny task every run of the end-to-end comparison trains, in one place (to re-tune when the
# synthetic world changes). The clustering baseline (one network, no EMA teacher: the loss acts
# on the evaluated network directly) evaluated on the source domain's own test split
# (data.target=synthetic_a): a tiny network pre-trained for a few hundred steps scores far above
# chance there, so a broken loss has something to destroy, while on the other domain it is close
# to chance. The adaptation lr is high enough for gradient ascent to wreck the network within the
# 30 steps.
CONFIG = 'configs/cluster_baseline.py'
TINY = [
    '--config.data.target=synthetic_a',
    '--config.data.synthetic.num_train_ids=24',
    '--config.data.synthetic.num_test_ids=40',
    '--config.data.synthetic.min_images=4',
    '--config.data.synthetic.max_images=6',
    '--config.data.height=32',
    '--config.data.width=16',
    '--config.data.batch_size=16',
    '--config.data.eval_batch_size=64',
    '--config.model.depth=18',
    '--config.model.width=16',
    '--config.pretrain.epochs=3',
    '--config.pretrain.iters=80',
    '--config.pretrain.warmup_epochs=0',
    '--config.pretrain.milestones=(2,)',
    '--config.pretrain.eval_every=0',
    '--config.train.epochs=2',
    '--config.train.iters=15',
    '--config.train.lr=3.5e-3',
    '--config.train.eval_every=2',
    '--config.train.coupling=False',
    '--config.cluster.num_clusters=24',
]
SEEDS = '3'
# The baseline, the baseline again under another name, and the baseline's loss negated.
VARIANTS = [
    'base',
    'same',
    'broken=--config.loss.function=broken_loss:gradient_ascent',
]
# A deliberately broken loss, imported by the runs from a folder on their PYTHONPATH (not from
# this module, which imports the tool and with it jaxreid.main, the runs' own entry point).
BROKEN_LOSS = '''from jaxreid import methods


def gradient_ascent(outputs, labels, weights):
  """The clustering baseline's loss, negated: every step climbs it."""
  total, metrics = methods.supervised_loss(outputs, labels, weights)
  metrics['loss/total'] = -total
  return -total, metrics
'''


# ----------------------------------------------------------------------------------------------
# Statistics

T_975_2DOF = 4.302652729749464  # Student's t quantile 0.975 with 2 degrees of freedom (tables)


def test_mean_and_sample_std():
  mean, std = compare.mean_std([1.0, 2.0, 3.0, 4.0])
  assert mean == 2.5
  assert std == pytest.approx(math.sqrt(5 / 3))  # sum of squares 5, n - 1 = 3
  mean, std = compare.mean_std([7.0])
  assert mean == 7.0 and math.isnan(std)


def test_paired_differences_are_variant_minus_baseline_on_shared_seeds():
  base = {1: 10.0, 2: 20.0, 3: 30.0}
  variant = {1: 11.0, 2: 18.0, 4: 0.0}
  assert compare.paired_differences(base, variant) == {1: 1.0, 2: -2.0}


@pytest.mark.parametrize(
    'differences, mean, std, verdict',
    [
        ([1.0, 2.0, 3.0], 2.0, 1.0, 'within seed noise'),  # half-width 2.48 > 2
        ([2.0, 2.5, 3.0], 2.5, 0.5, 'better than base beyond seed noise'),  # 1.24 < 2.5
        ([-2.0, -2.5, -3.0], -2.5, 0.5, 'worse than base beyond seed noise'),
        ([0.0, 0.0, 0.0], 0.0, 0.0, 'within seed noise'),  # identical runs: [0, 0]
    ],
)
def test_t_interval_by_hand(differences, mean, std, verdict):
  half = T_975_2DOF * std / math.sqrt(3)
  low, high = compare.t_interval(differences)
  assert low == pytest.approx(mean - half) and high == pytest.approx(mean + half)
  assert compare.verdict((low, high), 'base') == verdict
  summary = compare.difference_summary(
      {s: 50.0 for s in (1, 2, 3)}, {s: 50.0 + d for s, d in zip((1, 2, 3), differences)}, 'base'
  )
  assert summary['per_seed'] == {'1': differences[0], '2': differences[1], '3': differences[2]}
  assert summary['mean'] == pytest.approx(mean) and summary['std'] == pytest.approx(std)
  assert summary['t_interval'] == pytest.approx([mean - half, mean + half])
  assert summary['verdict'] == verdict


def test_t_interval_with_five_seeds():
  d = [0.5, 1.5, -0.5, 2.5, 1.0]  # mean 1.0, sum of squared deviations 5.0 -> std sqrt(5/4)
  half = 2.7764451051977987 * math.sqrt(5 / 4) / math.sqrt(5)  # t 0.975 with 4 dof
  assert compare.t_interval(d) == pytest.approx((1.0 - half, 1.0 + half))


def test_one_seed_has_no_interval():
  assert compare.t_interval([1.0]) is None and compare.bootstrap_interval([1.0]) is None
  assert 'needs >= 2 seeds' in compare.verdict(None, 'base')
  summary = compare.difference_summary({1: 1.0}, {1: 3.0}, 'base')
  assert summary['mean'] == 2.0 and summary['std'] is None and summary['t_interval'] is None
  json.dumps(summary, allow_nan=False)  # no nan in the JSON


def test_bootstrap_interval():
  d = [1.0, 2.0, 3.0, 10.0]
  low, high = compare.bootstrap_interval(d)
  assert min(d) <= low < sum(d) / len(d) < high <= max(d)
  assert compare.bootstrap_interval(d) == (low, high)  # repeatable
  assert compare.bootstrap_interval([2.0, 2.0]) == (2.0, 2.0)


def test_the_plot_draws_with_one_seed_and_with_several(tmp_path):
  one = plots.plot_seed_comparison(
      {'base': {1: 20.0}, 'new': {1: 22.0}},
      {'new': {1: 2.0}},
      {'new': None},
      str(tmp_path / '1.png'),
  )
  values = {'base': {1: 20.0, 2: 25.0, 3: 22.0}, 'a': {1: 21.0, 2: 27.0, 3: 22.5}}
  differences = {'a': compare.paired_differences(values['base'], values['a'])}
  interval = compare.t_interval(list(differences['a'].values()))
  several = plots.plot_seed_comparison(
      values, differences, {'a': interval}, str(tmp_path / '3.png'), metric='top1'
  )
  for path in (one, several):
    with Image.open(path) as im:
      assert im.format == 'PNG'


# ----------------------------------------------------------------------------------------------
# Variants, seeds, runs


def test_seeds_are_a_count_or_a_list():
  assert compare.parse_seeds('3') == [1, 2, 3]
  assert compare.parse_seeds('1,2,5') == [1, 2, 5]
  assert compare.parse_seeds('4,0') == [4, 0]
  for bad in ('0', 'x', '1,,2', '1,2,1', '-1,2', ''):
    with pytest.raises(compare.CompareError, match='--seeds'):
      compare.parse_seeds(bad)


def test_variants_and_their_commands():
  margin = compare.parse_variant(
      "margin=--config=experiments/extra_loss_example.py --config.loss.margin_tri='0.5'"
  )
  assert margin == compare.Variant(
      'margin', ('--config=experiments/extra_loss_example.py', '--config.loss.margin_tri=0.5')
  )
  base = compare.parse_variant('base')
  assert base == compare.Variant('base', ())
  # the shared config unless the variant names its own; shared arguments before the variant's
  assert compare.variant_args(base, 'configs/mmt.py', ['--config.x=1']) == [
      '--config=configs/mmt.py',
      '--config.x=1',
  ]
  assert compare.variant_args(margin, 'configs/mmt.py') == list(margin.args)
  # the config goes first whoever gives it: absl reads an override only after its --config
  spaced = compare.Variant('b', ('--config.loss.tri=0', '--config', 'configs/abmt.py'))
  assert compare.variant_args(spaced, 'configs/mmt.py', ['--config.train.epochs=2']) == [
      '--config=configs/abmt.py',
      '--config.train.epochs=2',
      '--config.loss.tri=0',
  ]
  runs = compare.plan([base, margin], [1, 2], 'out', 'configs/mmt.py')
  assert [(r.variant, r.seed) for r in runs] == [
      ('base', 1),
      ('margin', 1),
      ('base', 2),
      ('margin', 2),
  ]  # seed-major: an interrupted comparison already has pairs
  assert runs[3].args[-2:] == (
      '--config.seed=2',
      f'--workdir={os.path.join("out", "margin", "seed2")}',
  )
  assert runs[3].command[1:3] == ['-m', 'jaxreid.main']
  assert runs[3].log == os.path.join('out', 'margin', 'seed2', 'log.txt')
  # {seed} in an argument is the run's seed: here each seed pre-trains its own source models
  own_sources = compare.plan(
      [base, margin], [2, 5], 'out', 'configs/mmt.py', ['--config.pretrain.seed={seed}']
  )
  assert [r.args[1] for r in own_sources] == ['--config.pretrain.seed=2'] * 2 + [
      '--config.pretrain.seed=5'
  ] * 2


@pytest.mark.parametrize(
    'variants, config, match',
    [
        (['a'], 'configs/mmt.py', 'at least 2'),
        (['a', 'a'], 'configs/mmt.py', 'a is used twice'),
        (['a', 'b'], '', 'variant a has no config'),
        (['a', 'b=--config.seed=3'], 'configs/mmt.py', 'set by the comparison'),
        (['a', 'b=--workdir=x'], 'configs/mmt.py', 'set by the comparison'),
        (['a/b', 'c'], 'configs/mmt.py', 'folder name'),
        (['a', 'b=--config.x="unclosed'], 'configs/mmt.py', 'cannot split'),
    ],
)
def test_bad_variants(variants, config, match):
  with pytest.raises(compare.CompareError, match=match):
    compare.plan([compare.parse_variant(v) for v in variants], [1], 'out', config)


def _main(*args) -> tuple[int, str, str]:
  """jaxreid-compare in this process: (exit status, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = compare_tool.main(list(args))
  return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    'args, expected',
    [
        (['--variant=a', '--config=configs/mmt.py'], 'at least 2'),
        (['--variant=a', '--variant=a', '--config=configs/mmt.py'], 'used twice'),
        (['--variant=a', '--variant=b', '--config=configs/mmt.py', '--seeds=1,1'], 'repeated'),
        (['--variant=a', '--variant=b', '--config=configs/nope.py'], 'configs/nope.py not found'),
        (
            ['--variant=a', '--variant=b=--config.loss.soft_trii=0', '--config=configs/mmt.py'],
            'variant b: unknown config key config.loss.soft_trii',
        ),
        (['--variant=a', '--variant=b', '--config=configs/mmt.py', '--metric=acc'], '--metric'),
    ],
)
def test_bad_input_is_one_line(args, expected, tmp_path):
  code, out, err = _main(*args, f'--out={tmp_path / "c"}')
  assert code == 2 and out == '', err
  assert err.startswith('error: ') and err.count('\n') == 1 and expected in err, err
  assert not (tmp_path / 'c').exists()  # nothing run, nothing written


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
  out = tmp_path / 'c'
  code, stdout, err = _main(
      f'--config={CONFIG}',
      '--seeds=1,2',
      f'--out={out}',
      f'--args={shlex.join(TINY)}',
      *[f'--variant={v}' for v in VARIANTS],
      '--dry_run',
  )
  assert code == 0, err
  lines = stdout.splitlines()
  assert len(lines) == 6 and not out.exists()
  first = shlex.split(lines[0])
  assert first[1:4] == ['-m', 'jaxreid.main', f'--config={CONFIG}'] and first[4:-2] == TINY
  assert first[-2:] == ['--config.seed=1', f'--workdir={out / "base" / "seed1"}']
  assert shlex.split(lines[5])[-3:] == [
      '--config.loss.function=broken_loss:gradient_ascent',
      '--config.seed=2',
      f'--workdir={out / "broken" / "seed2"}',
  ]


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope='module')
def comparison(tmp_path_factory):
  """One comparison of VARIANTS over SEEDS on the tiny task, then the same command again."""
  out = tmp_path_factory.mktemp('compare') / 'c'
  args = [
      f'--config={CONFIG}',
      f'--seeds={SEEDS}',
      f'--out={out}',
      f'--args={shlex.join(TINY)}',
      *[f'--variant={v}' for v in VARIANTS],
  ]
  modules = tmp_path_factory.mktemp('modules')
  (modules / 'broken_loss.py').write_text(BROKEN_LOSS)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('JAXREID_DATA_CACHE', str(tmp_path_factory.mktemp('world')))
    mp.setenv(
        'PYTHONPATH', os.pathsep.join(filter(None, [str(modules), os.environ.get('PYTHONPATH')]))
    )
    first = _main(*args)
    assert first[0] == 0, first[2] + first[1]
    summary = json.loads((out / 'comparison.json').read_text())
    # The same command again: every run is finished; nothing may be trained.
    mp.setattr(compare.subprocess, 'call', _no_training)
    t = time.time()
    again = _main(*args)
    again_seconds = time.time() - t
    # ... and with a setting changed under the same --out: refused, nothing run.
    changed = _main(*[a.replace('train.iters=15', 'train.iters=16') for a in args])
  return dict(
      out=out,
      args=args,
      first=first,
      again=again,
      again_seconds=again_seconds,
      summary=summary,
      changed=changed,
  )


def _no_training(*args, **kwargs):
  raise AssertionError(f'a finished comparison trained again: {args}')


@pytest.mark.slow
def test_a_copy_of_the_baseline_is_within_seed_noise(comparison):
  s = comparison['summary']
  assert s['baseline'] == 'base' and s['metric'] == 'mAP' and s['seeds'] == [1, 2, 3]
  same = next(d for d in s['differences'] if d['variant'] == 'same')
  assert same['against'] == 'base'
  assert same['mAP']['per_seed'] == {'1': 0.0, '2': 0.0, '3': 0.0}  # CPU runs are repeatable
  low, high = same['mAP']['t_interval']
  assert low <= 0 <= high
  assert same['verdict'] == same['mAP']['verdict'] == 'within seed noise'
  assert 'same is within seed noise' in comparison['first'][1]


@pytest.mark.slow
def test_a_broken_loss_is_worse_beyond_seed_noise(comparison):
  s = comparison['summary']
  broken = next(d for d in s['differences'] if d['variant'] == 'broken')
  base = next(v for v in s['variants'] if v['name'] == 'base')
  values = {r['seed']: r['adapted']['mAP'] for r in base['runs']}
  ruined = next(v for v in s['variants'] if v['name'] == 'broken')
  for r in ruined['runs']:
    assert broken['mAP']['per_seed'][str(r['seed'])] == pytest.approx(
        r['adapted']['mAP'] - values[r['seed']]
    )
  assert broken['mAP']['t_interval'][1] < 0, broken
  assert broken['verdict'] == 'worse than base beyond seed noise'
  assert 'broken is worse than base beyond seed noise' in comparison['first'][1]


@pytest.mark.slow
def test_the_json_holds_every_run_and_the_statistics(comparison):
  s, out = comparison['summary'], comparison['out']
  assert [v['name'] for v in s['variants']] == ['base', 'same', 'broken']
  for v in s['variants']:
    assert [r['seed'] for r in v['runs']] == [1, 2, 3]
    maps = [r['adapted']['mAP'] for r in v['runs']]
    mean, std = compare.mean_std(maps)
    assert v['mean']['mAP'] == pytest.approx(mean) and v['std']['mAP'] == pytest.approx(std)
    assert {'mAP', 'top1', 'source_only_mAP', 'source_only_top1'} <= set(v['mean'])
    for r in v['runs']:
      results = json.loads((out / v['name'] / f'seed{r["seed"]}' / 'results.json').read_text())
      assert r['adapted'] == results['cluster_baseline (adapted)']
      assert r['source_only'] == results['source only']
      command = shlex.split(r['command'])
      assert command[1:3] == ['-m', 'jaxreid.main'] and f'--config.seed={r["seed"]}' in command
      assert r['workdir'] == str(out / v['name'] / f'seed{r["seed"]}') and r['seconds'] > 0
      log = (out / v['name'] / f'seed{r["seed"]}' / 'log.txt').read_text()
      assert log.startswith('# ') and r['command'] in log.splitlines()[0]
  # every run of a seed shares its source pre-training: the source-only rows are equal
  for seed in range(3):
    assert len({json.dumps(v['runs'][seed]['source_only']) for v in s['variants']}) == 1
  for d in s['differences']:
    assert set(d['top1']) == set(d['mAP'])
  with Image.open(out / 'comparison.png') as im:
    assert im.format == 'PNG' and im.size[0] > 400


@pytest.mark.slow
def test_the_console_shows_progress_per_run_then_the_table(comparison):
  stdout = comparison['first'][1]
  progress = [l for l in stdout.splitlines() if l.startswith('[')]
  order = [(v, s) for s in (1, 2, 3) for v in ('base', 'same', 'broken')]
  assert len(progress) == 9
  for line, (variant, seed), i in zip(progress, order, range(1, 10)):
    assert line.startswith(f'[{i}/9] {variant} seed {seed} (log: ')
    assert ' mAP ' in line and ' top1 ' in line and '(source only ' in line
  table = stdout.split('\n\n')[1]
  assert 'base (baseline)' in table and 'source only mAP' in table and '+-' in table
  assert f'wrote {comparison["out"] / "comparison.json"}' in stdout


@pytest.mark.slow
def test_rerunning_trains_nothing_and_gives_the_same_result(comparison):
  code, stdout, err = comparison['again']
  assert code == 0, err
  assert stdout.count('finished before') == 9
  assert json.loads((comparison['out'] / 'comparison.json').read_text()) == comparison['summary']


@pytest.mark.slow
def test_a_changed_variant_under_the_same_out_is_refused(comparison):
  code, stdout, err = comparison['changed']
  assert code == 2 and err.count('\n') == 1, err
  assert 'holds a run of another command' in err and 'new --out' in err
  assert 'finished before' not in stdout


@pytest.mark.slow
def test_the_dry_run_marks_the_finished_runs(comparison):
  code, stdout, _ = _main(*comparison['args'], '--dry_run')
  assert code == 0 and stdout.count('  # finished') == 9


def test_a_failed_run_is_one_line_naming_its_log(tmp_path):
  out = tmp_path / 'c'
  # the key exists (checked before any run), the value is refused by the run itself
  code, stdout, err = _main(
      f'--config={CONFIG}',
      '--seeds=1',
      f'--out={out}',
      '--variant=bad=--config.train.lr=-1',
      '--variant=other',
  )
  log = out / 'bad' / 'seed1' / 'log.txt'
  assert code == 2 and err.count('\n') == 1, err
  assert err.startswith('error: run bad seed 1 failed (exit status 2): config.train.lr')
  assert str(log) in err and log.is_file()
  assert 'failed' in stdout and not (out / 'other').exists()
