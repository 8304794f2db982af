"""Prints a markdown table of the runs under a folder (each sub-folder a work dir).

Usage: python experiments/summarise.py workdirs/real/cuhk2pku
Pre-training folders give the source model's own-domain and target (source only) results; every
adaptation run gives its starting point (source only) and its adapted result, from results.json,
plus the last coupling values from metrics.jsonl and, for ABMT, each branch's mAP alone.
"""

import json
import os
import sys


def _last_record(path, stage_prefix=None, key=None):
  if not os.path.exists(path):
    return None
  last = None
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if stage_prefix and not r.get('stage', '').startswith(stage_prefix):
        continue
      if key and key not in r:
        continue
      last = r
  return last


def main(folder: str) -> None:
  print(
      f'| run ({folder}) | source-only mAP / top-1 | adapted mAP | top-1 | top-5 | top-10 | '
      'coupling teachers / teacher-student | branch mAP avg / max (source -> adapted) | '
      'wall time |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if not os.path.isdir(path):
      continue
    metrics = os.path.join(path, 'metrics.jsonl')
    results = os.path.join(path, 'results.json')
    if os.path.exists(results):
      with open(results) as f:
        res = json.load(f)
      src = res.get('source only') or {}
      adapted = next((r for label, r in res.items() if 'adapted' in label), None) or {}
      coup = _last_record(metrics, key='coupling/teacher_student') or {}
      c = (
          ' / '.join(
              f'{coup[k]:.3f}'
              for k in ('coupling/teachers', 'coupling/teacher_student')
              if k in coup
          )
          or '-'
      )
      cells = [f"{src.get('mAP', float('nan')):.1f} / {src.get('top1', float('nan')):.1f}"]
      cells += [
          f'{adapted[k]:.1f}' if k in adapted else '-' for k in ('mAP', 'top1', 'top5', 'top10')
      ]
      branches = (
          ' -> '.join(
              f"{r['avg/mAP']:.1f} / {r['max/mAP']:.1f}" for r in (src, adapted) if 'avg/mAP' in r
          )
          or '-'
      )
      # config.json is written when a run starts, results.json when it ends (resumed runs
      # include the time they were stopped)
      wall = os.path.getmtime(results) - os.path.getmtime(os.path.join(path, 'config.json'))
      print(f'| {name} | ' + ' | '.join(cells) + f' | {c} | {branches} | {wall / 60:.0f} min |')
    elif name.startswith('pretrain'):
      r = _last_record(metrics, stage_prefix='pretrain_final')
      if r:
        print(
            f"| {name} (source model) | {r['target/mAP']:.1f} / {r['target/top1']:.1f} | "
            f"source domain: {r['source/mAP']:.1f} | {r['source/top1']:.1f} | - | - | - | - | - |"
        )


if __name__ == '__main__':
  main(sys.argv[1])
