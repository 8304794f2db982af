"""Where the time of a run goes: decoding, source models, evaluations, feature passes, clustering,
training, from the run's metrics.jsonl (the 'timing' record and every adaptation epoch's
`*_seconds` fields).

  python experiments/phase_breakdown.py runs/real/msmt2market/mmt_s2 [more run dirs...]

Prints one table per run: seconds and share of the wall time from start to the last record
(summed over the sessions of a resumed run).
Runs written before the phase fields existed show only what they recorded (cluster and train
seconds) and say so.
"""

import json
import os
import sys

PHASES = (
    ('decoding images', 'timing', 'decode_seconds'),
    ('source models (load / pre-train)', 'timing', 'source_models_seconds'),
    ('source-only evaluation', 'timing', 'source_only_seconds'),
    ('feature passes (clustering + coupling)', 'epochs', 'features_seconds'),
    ('clustering', 'epochs', 'cluster_seconds'),
    ('training', 'epochs', 'train_seconds'),
    ('evaluation', 'epochs', 'evaluate_seconds'),
)


def read_records(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def breakdown(records: list[dict]) -> tuple[dict, float | None]:
  """{phase: seconds or None when not recorded}, total wall seconds (None if unknown).

  A resumed run has one 'timing' record per session (each decodes and evaluates the source model
  again): the wall time is the sum of the sessions' spans (each from its start to its last record
  before the next session starts), the setup phases are summed over sessions, and a rewritten
  epoch counts once (its last record); the work lost with an interrupted epoch counts as other.
  """
  last = {}
  for r in records:  # a resumed run rewrites an epoch: the last record per (stage, step) wins
    last[(r['stage'], r['step'])] = r
  sessions = sorted(
      (r for r in records if r['stage'] == 'timing' and 'started' in r), key=lambda r: r['started']
  )
  epochs = [r for (stage, _), r in last.items() if 'epoch' in r and 'cluster_seconds' in r]
  out = {}
  for name, where, key in PHASES:
    if where == 'timing':
      values = [r[key] for r in sessions if key in r]
    else:
      values = [r[key] for r in epochs if key in r]
    out[name] = sum(values) if values else None
  total = None
  if sessions:
    starts = [r['started'] for r in sessions] + [float('inf')]
    total = 0.0
    for start, next_start in zip(starts, starts[1:]):
      end = max(r['time'] for r in records if start <= r['time'] < next_start)
      total += end - start
  return out, total


def table(run_dir: str) -> str:
  phases, total = breakdown(read_records(run_dir))
  lines = [run_dir, f'{"phase":42s} {"seconds":>9s} {"share":>6s}']
  known = 0.0
  for name, seconds in phases.items():
    if seconds is None:
      lines.append(f'{name:42s} {"-":>9s}')
      continue
    known += seconds
    share = f'{100 * seconds / total:5.1f}%' if total else ''
    lines.append(f'{name:42s} {seconds:9.1f} {share:>6s}')
  if total:
    lines.append(
        f'{"other (checkpoints, plots, compilation)":42s} {total - known:9.1f} '
        f'{100 * (total - known) / total:5.1f}%'
    )
    lines.append(f'{"total (wall, start to last record)":42s} {total:9.1f}')
  else:
    lines.append('(no timing record: run written before the phase fields existed)')
  return '\n'.join(lines)


if __name__ == '__main__':
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  print('\n\n'.join(table(d) for d in sys.argv[1:]))
