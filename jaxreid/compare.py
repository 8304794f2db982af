"""Is a change better than the baseline, beyond seed noise? Variants trained over seeds, compared
in pairs (the command line: `jaxreid-compare`, `jaxreid.tools.compare`).

A variant is a training command (`python -m jaxreid.main` arguments); each runs once per seed,
in `<out>/<variant>/seed<S>`, seed by seed (seed 1 of every variant, then seed 2, ...) so that an
interrupted comparison already holds complete pairs. Rerunning skips the finished runs, and
`jaxreid.main` resumes an interrupted one.

Two variants at the same seed share the seed's randomness (data order, initial weights, source
pre-training), so the comparison is paired: the per-seed difference variant - baseline removes
what the seed does to both, and the t interval of the mean difference says whether the change
stands out from what is left. The statistics are plain numpy / scipy functions of the values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable
from typing import Mapping
from typing import Sequence

import numpy as np
from scipy import stats

from jaxreid import plots

METRICS = ('mAP', 'top1', 'top5', 'top10')
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
RESULT_FILE = 'comparison.json'
PLOT_FILE = 'comparison.png'
SEED_FIELD = '{seed}'  # in a variant's arguments: the run's seed
RUN_FILE = 'command.json'  # in each run's work dir: the command that made it (and its time)
LOG_FILE = 'log.txt'
TRAINER = ('-m', 'jaxreid.main')
# Set by the comparison for every run, so not allowed in a variant's arguments.
RESERVED = re.compile(r'--?(workdir|config\.seed)(=|$)')
_CONFIG = re.compile(r'--?config(=|$)')
_NAME = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.+-]*')


class CompareError(ValueError):
  """Bad input to a comparison, or a run that failed; the message says which and what to do."""


class Interrupted(CompareError):
  """Ctrl-C during a run: the run is stopped (it resumes from its last checkpoint)."""


# ----------------------------------------------------------------------------------------------
# Statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1: the seeds are a sample of all seeds); the std
  of a single value is nan (unknown, not 0)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError('mean_std: no values')
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def paired_differences(
    baseline: Mapping[int, float], variant: Mapping[int, float]
) -> dict[int, float]:
  """seed -> variant - baseline, over the seeds both have: what a seed does to both cancels."""
  return {s: float(variant[s]) - float(baseline[s]) for s in baseline if s in variant}


def t_interval(
    differences: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
  """The paired t interval of the mean difference: mean +- t_{(1+c)/2, n-1} * std / sqrt(n)
  (std with ddof=1); None for fewer than two values (no spread to judge by)."""
  n = len(differences)
  if n < 2:
    return None
  mean, std = mean_std(differences)
  half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
  return mean - half, mean + half


def bootstrap_interval(
    differences: Sequence[float],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
  """Percentile bootstrap interval of the mean difference (no normality assumed, but with a few
  seeds it is narrower than it should be: the t interval is the one to go by); None for fewer
  than two values. Repeatable: a fixed `seed`."""
  d = np.asarray(differences, np.float64)
  if d.size < 2:
    return None
  rng = np.random.default_rng(seed)
  means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
  tail = (1 - confidence) / 2 * 100
  low, high = np.percentile(means, [tail, 100 - tail])
  return float(low), float(high)


def verdict(interval: tuple[float, float] | None, baseline: str) -> str:
  """Whether the mean difference stands out from the seed noise (the interval excludes 0);
  higher is better (every metric here)."""
  if interval is None:
    return 'no interval: an interval needs >= 2 seeds'
  low, high = interval
  if low > 0:
    return f'better than {baseline} beyond seed noise'
  if high < 0:
    return f'worse than {baseline} beyond seed noise'
  return 'within seed noise'


def difference_summary(
    baseline: Mapping[int, float],
    variant: Mapping[int, float],
    baseline_name: str,
    confidence: float = CONFIDENCE,
) -> dict:
  """Per-seed differences, their mean and std, both intervals and the verdict (t interval)."""
  per_seed = paired_differences(baseline, variant)
  d = list(per_seed.values())
  mean, std = mean_std(d)
  t = t_interval(d, confidence)
  boot = bootstrap_interval(d, confidence)
  return {
      'per_seed': {str(s): v for s, v in per_seed.items()},
      'mean': mean,
      'std': _finite(std),
      't_interval': list(t) if t else None,
      'bootstrap_interval': list(boot) if boot else None,
      'verdict': verdict(t, baseline_name),
  }


def _finite(x: float) -> float | None:
  """JSON has no nan: an unknown value is null."""
  return None if x is None or not math.isfinite(x) else float(x)


# ----------------------------------------------------------------------------------------------
# Variants and runs


@dataclasses.dataclass(frozen=True)
class Variant:
  """A training command: its name (a folder name) and its `jaxreid.main` arguments."""

  name: str
  args: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Run:
  variant: str
  seed: int
  workdir: str
  args: tuple[str, ...]  # jaxreid.main's, the seed and work dir included

  @property
  def command(self) -> list[str]:
    return [sys.executable, *TRAINER, *self.args]

  @property
  def log(self) -> str:
    return os.path.join(self.workdir, LOG_FILE)

  @property
  def label(self) -> str:
    return f'{self.variant} seed {self.seed}'


def parse_variant(text: str) -> Variant:
  """'NAME' or 'NAME=ARGS' (ARGS split as a shell would: quotes group)."""
  name, _, args = text.partition('=')
  name = name.strip()
  if not _NAME.fullmatch(name):
    raise CompareError(
        f'--variant={text}: the name {name!r} must be a folder name (letters, digits, _ . + -): '
        '--variant=NAME or --variant=NAME=ARGS'
    )
  try:
    return Variant(name, tuple(shlex.split(args)))
  except ValueError as e:
    raise CompareError(f'--variant={text}: cannot split its arguments ({e})') from None


def parse_seeds(text: str) -> list[int]:
  """'3' -> [1, 2, 3] (a count); '1,2,5' -> [1, 2, 5] (a list); non-negative, no repeats."""
  parts = [p.strip() for p in str(text).split(',')]
  try:
    numbers = [int(p) for p in parts]
  except ValueError:
    raise CompareError(
        f'--seeds={text}: expected a count (3 = seeds 1, 2, 3) or a list (1,2,3) of integers'
    ) from None
  if len(numbers) == 1:
    if numbers[0] < 1:
      raise CompareError(f'--seeds={text}: a count of seeds must be at least 1')
    return list(range(1, numbers[0] + 1))
  if any(n < 0 for n in numbers):
    raise CompareError(f'--seeds={text}: seeds must be non-negative')
  repeated = sorted({n for n in numbers if numbers.count(n) > 1})
  if repeated:
    raise CompareError(f'--seeds={text}: seed {repeated[0]} is repeated')
  return numbers


def _split_config(args: Sequence[str]) -> tuple[str | None, list[str]]:
  """(the last `--config` value in `args` or None, the other arguments)."""
  config, rest, i = None, [], 0
  while i < len(args):
    if _CONFIG.match(args[i]):
      _, eq, value = args[i].partition('=')
      if not eq:  # `--config PATH`
        if i + 1 == len(args):
          raise CompareError(f'{args[i]} needs a value: --config=FILE')
        value, i = args[i + 1], i + 1
      config = value
    else:
      rest.append(args[i])
    i += 1
  return config, rest


def variant_args(variant: Variant, config: str = '', shared: Sequence[str] = ()) -> list[str]:
  """The variant's `jaxreid.main` arguments without seed and work dir: its config (its own
  `--config`, else one in `shared`, else `config`) first, as the overrides need it before them,
  then `shared`, then the variant's own arguments."""
  own_config, own = _split_config(variant.args)
  shared_config, shared = _split_config(shared)
  config = own_config or shared_config or config
  if not config:
    raise CompareError(
        f'variant {variant.name} has no config: give --config=FILE, or --config=FILE in the '
        'variant (--variant=NAME=--config=FILE ...)'
    )
  for arg in [*shared, *own]:
    if RESERVED.match(arg):
      raise CompareError(
          f'variant {variant.name}: {arg} is set by the comparison (--config.seed from --seeds, '
          '--workdir from --out); leave it out'
      )
  return [f'--config={config}', *shared, *own]


def check_variants(variants: Sequence[Variant]) -> None:
  if len(variants) < 2:
    raise CompareError(
        f'{len(variants)} variant(s) given; a comparison needs at least 2 (--variant=NAME[=ARGS] '
        'for each, the first is the baseline)'
    )
  names = [v.name for v in variants]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise CompareError(f'the variant name {repeated[0]} is used twice; give each its own name')


def plan(
    variants: Sequence[Variant],
    seeds: Sequence[int],
    out: str,
    config: str = '',
    shared: Sequence[str] = (),
) -> list[Run]:
  """Every run, seed-major (seed 1 of every variant, then seed 2, ...), so that an interrupted
  comparison already has complete pairs. `{seed}` in an argument becomes the run's seed (e.g.
  `--config.pretrain.seed={seed}`: each seed's own source models)."""
  check_variants(variants)
  runs = []
  for seed in seeds:
    for v in variants:
      workdir = os.path.join(out, v.name, f'seed{seed}')
      own = [a.replace(SEED_FIELD, str(seed)) for a in variant_args(v, config, shared)]
      args = own + [f'--config.seed={seed}', f'--workdir={workdir}']
      runs.append(Run(v.name, seed, workdir, tuple(args)))
  return runs


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def is_finished(run: Run) -> bool:
  """Whether `run` has its results; raises CompareError when its work dir holds a run of another
  command (a variant or setting changed under the same --out)."""
  record = os.path.join(run.workdir, RUN_FILE)
  results = os.path.join(run.workdir, 'results.json')
  if os.path.isfile(record):
    before = _read_json(record).get('args')
    if before != list(run.args):
      raise CompareError(
          f'{run.workdir} holds a run of another command ({shlex.join(before or [])}), not '
          f'{shlex.join(run.args)}: the variant or its settings changed; use a new --out, or '
          'delete that folder to redo the run'
      )
  elif os.path.exists(results):
    raise CompareError(
        f'{run.workdir} holds a run that this comparison did not start (no {RUN_FILE}); use a new '
        '--out'
    )
  return os.path.isfile(results)


def result_rows(results: Mapping, where: str = '') -> tuple[dict, dict]:
  """(the run's result, its source-only row) from results.json: the adapted row, or for a
  pre-training run the target's; the source-only row is {} when there is none."""
  adapted = [k for k in results if k.endswith('(adapted)')]
  if adapted:
    return dict(results[adapted[0]]), dict(results.get('source only') or {})
  if 'target domain (source only)' in results:  # configs/pretrain.py
    return dict(results['target domain (source only)']), {}
  raise CompareError(
      f'{where or "results.json"} has no adapted result (rows: {", ".join(results)})'
  )


def read_result(run: Run, metric: str) -> dict:
  """The finished run's rows and record: {'adapted': {...}, 'source_only': {...}, ...}."""
  adapted, source_only = result_rows(
      _read_json(os.path.join(run.workdir, 'results.json')),
      os.path.join(run.workdir, 'results.json'),
  )
  if not isinstance(adapted.get(metric), (int, float)):
    raise CompareError(
        f'{run.label}: its results have no {metric} (a target without labels and no '
        f'config.data.val_root is not scored); see {run.log}'
    )
  record = _read_json(os.path.join(run.workdir, RUN_FILE))
  return {'adapted': adapted, 'source_only': source_only, 'seconds': record.get('seconds')}


def _clock(seconds: float) -> str:
  s = int(round(seconds))
  return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


def _last_error(log: str) -> str:
  """The child's own one-line error (jaxreid.main's `error: ...`, without the prefix), else its
  last line."""
  try:
    with open(log, errors='replace') as f:
      lines = [l.strip() for l in f.readlines()[-200:] if l.strip()]
  except OSError:
    return ''
  errors = [l[len('error: ') :] for l in lines if l.startswith('error: ')]
  return (errors or lines or [''])[-1]


def execute(run: Run) -> float:
  """Runs `run` (its output appended to its log); returns the seconds it took. A run that fails
  raises CompareError naming the run, its error and its log; its work dir is kept (a rerun
  resumes it)."""
  os.makedirs(run.workdir, exist_ok=True)
  record = os.path.join(run.workdir, RUN_FILE)
  with open(record, 'w') as f:
    json.dump({'args': list(run.args), 'command': shlex.join(run.command)}, f, indent=2)
  started = time.time()
  with open(run.log, 'a') as log:
    log.write(f'# {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(run.command)}\n')
    log.flush()
    code = subprocess.call(run.command, stdout=log, stderr=subprocess.STDOUT)
  seconds = time.time() - started
  if code != 0:
    error = _last_error(run.log)
    why = f'killed by signal {-code}' if code < 0 else f'exit status {code}'
    raise CompareError(
        f'run {run.label} failed ({why}){": " + error if error else ""}; its log: {run.log} '
        '(the finished runs are kept; rerun the comparison to resume)'
    )
  with open(record, 'w') as f:
    json.dump(
        {'args': list(run.args), 'command': shlex.join(run.command), 'seconds': seconds},
        f,
        indent=2,
    )
  return seconds


def _progress_result(result: dict, metric: str) -> str:
  text = ' '.join(
      f'{m} {result["adapted"][m]:.1f}' for m in _reported(metric) if m in result['adapted']
  )
  if metric in result['source_only']:
    text += f' (source only {result["source_only"][metric]:.1f})'
  return text


def run_all(
    runs: Sequence[Run],
    metric: str = 'mAP',
    *,
    echo: Callable[..., None] = print,
) -> dict[tuple[str, int], dict]:
  """Runs what is not finished, one line per run on `echo` (which run, its log, elapsed,
  result); returns (variant, seed) -> `read_result`. Checks every work dir before running any."""
  finished = [is_finished(r) for r in runs]
  results = {}
  for i, (run, done) in enumerate(zip(runs, finished)):
    head = f'[{i + 1}/{len(runs)}] {run.label}'
    if done:
      result = read_result(run, metric)
      took = result['seconds']
      took = f' in {_clock(took)}' if took is not None else ''
      echo(f'{head}: finished before{took}: {_progress_result(result, metric)}', flush=True)
    else:
      echo(f'{head} (log: {run.log}) ... ', end='', flush=True)
      try:
        seconds = execute(run)
      except CompareError:
        echo('failed', flush=True)
        raise
      except KeyboardInterrupt:
        echo('interrupted', flush=True)
        raise Interrupted(
            f'interrupted during run {run.label}; rerun the same command to resume (the finished '
            'runs are kept)'
        ) from None
      result = read_result(run, metric)
      echo(f'{_clock(seconds)}: {_progress_result(result, metric)}', flush=True)
    results[(run.variant, run.seed)] = result
  return results


# ----------------------------------------------------------------------------------------------
# The comparison


def _reported(metric: str) -> list[str]:
  """The metric compared, then top-1 (or mAP when top-1 is the metric)."""
  return [metric, 'top1' if metric != 'top1' else 'mAP']


def summarise(
    variants: Sequence[Variant],
    seeds: Sequence[int],
    runs: Sequence[Run],
    results: Mapping[tuple[str, int], dict],
    metric: str = 'mAP',
    confidence: float = CONFIDENCE,
) -> dict:
  """The comparison as JSON-ready data: every run (command, rows), each variant's mean and std
  per metric (source only too), and each variant's paired differences from the baseline."""
  baseline = variants[0].name
  by_run = {(r.variant, r.seed): r for r in runs}
  reported = _reported(metric)
  out = {
      'metric': metric,
      'seeds': list(seeds),
      'baseline': baseline,
      'confidence': confidence,
      'variants': [],
      'differences': [],
  }
  values = {}  # (variant, metric name) -> seed -> value
  for v in variants:
    entry = {'name': v.name, 'args': list(v.args), 'runs': [], 'mean': {}, 'std': {}}
    for seed in seeds:
      run, result = by_run[(v.name, seed)], results[(v.name, seed)]
      entry['runs'].append(
          {
              'seed': seed,
              'workdir': run.workdir,
              'command': shlex.join(run.command),
              'seconds': result['seconds'],
              'adapted': result['adapted'],
              'source_only': result['source_only'],
          }
      )
      for m in reported:
        values.setdefault((v.name, m), {})[seed] = result['adapted'][m]
        if isinstance(result['source_only'].get(m), (int, float)):
          values.setdefault((v.name, f'source_only_{m}'), {})[seed] = result['source_only'][m]
    for m in [*reported, *[f'source_only_{m}' for m in reported]]:
      if len(values.get((v.name, m), {})) == len(seeds):
        mean, std = mean_std(list(values[(v.name, m)].values()))
        entry['mean'][m], entry['std'][m] = mean, _finite(std)
    out['variants'].append(entry)
  for v in variants[1:]:
    diff = {'variant': v.name, 'against': baseline}
    for m in reported:
      diff[m] = difference_summary(values[(baseline, m)], values[(v.name, m)], baseline, confidence)
    diff['verdict'] = diff[metric]['verdict']
    out['differences'].append(diff)
  return out


def _pm(mean: float | None, std: float | None) -> str:
  if mean is None:
    return '-'
  return f'{mean:.1f} +- {std:.1f}' if std is not None else f'{mean:.1f}'


def _table(rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def report(summary: Mapping) -> str:
  """The comparison as text: a table of mean +- std per variant, then each variant's paired
  differences, interval and verdict."""
  metric, other = _reported(summary['metric'])
  seeds = summary['seeds']
  pct = f'{summary["confidence"] * 100:g}%'
  rows = [['variant', metric, other, f'source only {metric}', f'gain ({metric})']]
  for v in summary['variants']:
    mean, std = v['mean'], v['std']
    so = f'source_only_{metric}'
    gain = f'{mean[metric] - mean[so]:+.1f}' if so in mean else '-'
    rows.append(
        [
            v['name'] + (' (baseline)' if v['name'] == summary['baseline'] else ''),
            _pm(mean.get(metric), std.get(metric)),
            _pm(mean.get(other), std.get(other)),
            _pm(mean.get(so), std.get(so)),
            gain,
        ]
    )
  lines = [
      f'{len(seeds)} seed(s): {", ".join(map(str, seeds))}; mean +- std over seeds (ddof 1), '
      'in percent',
      _table(rows),
  ]
  for d in summary['differences']:
    lines.append('')
    for m in (metric, other):
      s = d[m]
      per_seed = ', '.join(f'{k}: {v:+.1f}' for k, v in s['per_seed'].items())
      head = f'{d["variant"]} - {d["against"]}, {m}' + (' (headline)' if m == metric else '')
      lines.append(f'{head}: per seed {per_seed}; mean {s["mean"]:+.2f}')
      if s['t_interval'] is None:
        lines.append(f'  {s["verdict"]}')
        continue
      lo, hi = s['t_interval']
      blo, bhi = s['bootstrap_interval']
      lines.append(
          f'  {pct} paired t interval [{lo:+.2f}, {hi:+.2f}] (bootstrap [{blo:+.2f}, {bhi:+.2f}])'
          f': {d["variant"]} is {s["verdict"]}'
      )
  return '\n'.join(lines)


def write(summary: Mapping, out: str) -> list[str]:
  """`<out>/comparison.json` and `<out>/comparison.png`; returns their paths."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, RESULT_FILE)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, path)
  metric = summary['metric']
  values = {
      v['name']: {r['seed']: r['adapted'][metric] for r in v['runs']} for v in summary['variants']
  }
  differences = {
      d['variant']: {int(s): x for s, x in d[metric]['per_seed'].items()}
      for d in summary['differences']
  }
  intervals = {d['variant']: d[metric]['t_interval'] for d in summary['differences']}
  png = plots.plot_seed_comparison(
      values,
      differences,
      intervals,
      os.path.join(out, PLOT_FILE),
      metric=metric,
      confidence=summary['confidence'],
  )
  return [path, png]
