"""Does a change of code keep behaviour? Records, then compares, what training computes.

For every method: the metrics of one training step and a digest of the parameters after it (the
tiny networks of tests/train_fixtures.py), and the metrics.jsonl records and results of a short
run on a tiny synthetic world (pre-training, source-only evaluation, two adaptation epochs).

  python experiments/behaviour_check.py --out=before.json          # on the old code
  python experiments/behaviour_check.py --compare=before.json      # on the new code

`--compare` prints every value that differs by more than --rtol / --atol and exits 1 if any does.
Timings and paths are left out of the record.
"""

import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'tests')]

METHODS = ('pretrain', 'cluster_baseline', 'mean_teacher', 'mmt', 'abmt')
RUNS = ('cluster_baseline', 'mean_teacher', 'mmt', 'abmt')
_SKIP = ('seconds', 'started', 'time', 'eta')


def one_step(method: str) -> dict:
  """Metrics of one step and the sum / sum of squares of every parameter leaf after it."""
  import jax
  import train_fixtures

  state, metrics = train_fixtures.run_steps(method, 1, seed=3)
  out = {f'metric/{k}': float(np.asarray(v).reshape(-1)[0]) for k, v in metrics.items()}
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    leaf = np.asarray(leaf, np.float64)
    out[f'param{name}/sum'] = float(leaf.sum())
    out[f'param{name}/sumsq'] = float((leaf * leaf).sum())
  return out


def short_run(method: str, workdir: str) -> dict:
  """Every metrics.jsonl number and results.json of a tiny synthetic run."""
  import importlib

  from jaxreid import run

  c = importlib.import_module(f'configs.{method}').get_config()
  c.data.synthetic.update(dict(num_train_ids=12, num_test_ids=6, min_images=4, max_images=6))
  c.data.update(dict(height=32, width=16, batch_size=16, eval_batch_size=64))
  c.model.update(dict(depth=18, width=8))
  c.pretrain.update(dict(epochs=1, iters=2, warmup_epochs=1, milestones=(5,), eval_every=0))
  c.train.update(dict(epochs=2, iters=2, eval_every=1))
  if c.cluster.method == 'kmeans':
    c.cluster.num_clusters = 6
  summary = run.train_and_evaluate(c, workdir)
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for i, line in enumerate(f):
      record = json.loads(line)
      for k, v in record.items():
        if isinstance(v, (int, float)) and not any(s in k for s in _SKIP):
          out[f'record{i}/{k}'] = float(v)
  for row, values in summary.items():
    for k, v in values.items():
      if isinstance(v, (int, float)):
        out[f'result/{row}/{k}'] = float(v)
  return out


def record() -> dict:
  os.environ.setdefault('JAXREID_DATA_CACHE', tempfile.mkdtemp(prefix='behaviour_world_'))
  out = {}
  for method in METHODS:
    out.update({f'step/{method}/{k}': v for k, v in one_step(method).items()})
  for method in RUNS:
    with tempfile.TemporaryDirectory() as workdir:
      out.update({f'run/{method}/{k}': v for k, v in short_run(method, workdir).items()})
  return out


def compare(now: dict, before: dict, rtol: float, atol: float) -> list[str]:
  problems = [f'missing now: {k}' for k in sorted(set(before) - set(now))]
  problems += [f'new: {k}' for k in sorted(set(now) - set(before))]
  for k in sorted(set(now) & set(before)):
    a, b = now[k], before[k]
    if not (math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))):
      problems.append(f'{k}: {b!r} -> {a!r}')
  return problems


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument('--out', help='write the record here')
  g.add_argument('--compare', help='compare with a record written by --out')
  p.add_argument('--rtol', type=float, default=1e-6)
  p.add_argument('--atol', type=float, default=1e-6)
  args = p.parse_args()
  now = record()
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(now, f, indent=1, sort_keys=True)
    print(f'{len(now)} values written to {args.out}')
    return
  with open(args.compare) as f:
    before = json.load(f)
  problems = compare(now, before, args.rtol, args.atol)
  for line in problems:
    print(line)
  print(f'{len(now)} values compared, {len(problems)} differ')
  sys.exit(1 if problems else 0)


if __name__ == '__main__':
  main()
