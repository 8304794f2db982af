"""Prints a markdown table of the runs under a folder (each sub-folder a work dir).

Usage: python experiments/summarise.py workdirs/real/cuhk2pku
Source-only rows come from the pre-training runs' target evaluation; adapted rows from
results.json of each method's work dir.
"""

import json
import os
import sys


def main(folder: str) -> None:
  rows = []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    metrics = os.path.join(path, 'metrics.jsonl')
    results = os.path.join(path, 'results.json')
    if name.startswith('pretrain') and os.path.exists(metrics):
      with open(metrics) as f:
        final = [json.loads(l) for l in f if '"pretrain_final"' in l]
      if final:
        r = final[-1]
        rows.append((f'source only ({name})', r['target/mAP'], r['target/top1'], r['target/top5'],
                     r['target/top10']))
    elif os.path.exists(results):
      with open(results) as f:
        res = json.load(f)
      for label, r in res.items():
        if 'adapted' in label and r:
          rows.append((label, r['mAP'], r['top1'], r['top5'], r['top10']))
  print(f'| {folder} | mAP | top-1 | top-5 | top-10 |')
  print('|---|---|---|---|---|')
  for label, *vals in rows:
    print(f'| {label} | ' + ' | '.join(f'{v:.1f}' for v in vals) + ' |')


if __name__ == '__main__':
  main(sys.argv[1])
