"""Where a traced training step spends its device time, from a `jax.profiler` Perfetto trace.

`python -m jaxreid.tools.benchmark ... --profile_dir=DIR` traces one chunk of `--steps` steps per method
and dtype; this script reads the newest `perfetto_trace.json.gz` under each given folder and
prints, per kind of kernel (convolution / matrix product, reduction fusion, elementwise fusion,
copy / transpose, collective, other), the device time per step and its share, then the kernels
that take the most time. On a GPU the device's kernels are the events of its process
(`/device:GPU:0`); on the CPU, XLA's thunks on the host threads stand in for them.

Usage:
  python experiments/benchmarks/summarise_trace.py DIR/mmt_bfloat16 [--steps=20] [--top=25]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

# Kernel kinds by name, first match wins (cuDNN / cuBLAS / CUTLASS kernel names, XLA fusion names).
KINDS = (
    ('convolution / matrix product', r'conv|gemm|xmma|cutlass|cudnn|cublas|wgmma|nvjet|dot|ynn'),
    ('collective', r'nccl|all.?reduce|all.?gather|collective'),
    ('copy / transpose', r'copy|transpose|memcpy|memset|dynamic.update.slice'),
    ('reduction fusion', r'reduc'),
    ('elementwise fusion', r'fusion|loop_|elementwise|broadcast|convert'),
)
# Host-side events that are not kernels (Python frames, the runtime's own bookkeeping).
_HOST_NOISE = re.compile(r'^\$|PjitFunction|PjRt|Execute|Await|Allocate|Parse|Handle|Collect')


def kind_of(name: str) -> str:
  lower = name.lower()
  for kind, pattern in KINDS:
    if re.search(pattern, lower):
      return kind
  return 'other'


def load_events(folder: str) -> tuple[list[dict], str]:
  """The complete ('X') events on the device's process, or, where no process is a device (CPU),
  those of every process minus host bookkeeping; and a word saying which."""
  paths = sorted(glob.glob(os.path.join(folder, '**', 'perfetto_trace.json.gz'), recursive=True))
  if not paths:
    raise SystemExit(f'no perfetto_trace.json.gz under {folder}: trace with --profile_dir first')
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  process = {
      e['pid']: e.get('args', {}).get('name', '')
      for e in events
      if e.get('ph') == 'M' and e.get('name') == 'process_name'
  }
  device = {pid for pid, name in process.items() if re.search(r'/device:(GPU|TPU)', name)}
  complete = [e for e in events if e.get('ph') == 'X' and 'dur' in e]
  if device:
    return [e for e in complete if e['pid'] in device], 'device kernels'
  return [e for e in complete if not _HOST_NOISE.search(e.get('name', ''))], 'host thunks (CPU)'


def summarise(folder: str, steps: int, top: int) -> str:
  events, what = load_events(folder)
  by_kind = collections.Counter()
  by_name = collections.Counter()
  count = collections.Counter()
  for e in events:
    by_kind[kind_of(e['name'])] += e['dur']
    by_name[e['name']] += e['dur']
    count[e['name']] += 1
  total = sum(by_kind.values()) or 1.0
  lines = [
      f'{folder}: {len(events)} {what}, {total / 1e3 / steps:.2f} ms per step in kernels '
      f'({steps} steps traced)',
      '',
      '| kind | ms per step | share |',
      '|---|---|---|',
  ]
  for kind, us in by_kind.most_common():
    lines.append(f'| {kind} | {us / 1e3 / steps:.2f} | {100 * us / total:.1f}% |')
  lines += ['', f'| top {top} kernels | kind | calls per step | ms per step | share |']
  lines.append('|---|---|---|---|---|')
  for name, us in by_name.most_common(top):
    short = name if len(name) < 70 else name[:67] + '...'
    lines.append(
        f'| `{short}` | {kind_of(name)} | {count[name] / steps:.1f} | {us / 1e3 / steps:.3f} | '
        f'{100 * us / total:.1f}% |'
    )
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('folders', nargs='+', help='trace folders (DIR/<method>_<dtype>)')
  p.add_argument('--steps', type=int, default=20, help='steps in the traced chunk (--steps)')
  p.add_argument('--top', type=int, default=25)
  args = p.parse_args()
  for folder in args.folders:
    print(summarise(folder, args.steps, args.top))
    print()


if __name__ == '__main__':
  main()
