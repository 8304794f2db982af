"""Adaptation from a folder of unlabelled crops, checked against labels it never saw.

Makes an unlabelled copy of Market-1501's training images (random file names, one sub-folder per
camera, in a temporary folder deleted at the end), adapts torchreid's MSMT17 OSNet x0.25 to it
with the own-cameras preset (`configs/folder.py`), then scores what the run wrote on
Market-1501's labelled test split: the work dir's model in jaxreid (training's bicubic resize),
and the exported torchreid file (`model.pth`, ABMT's avg branch) with torchreid's preprocessing
(PIL bilinear resize, ImageNet mean / std) both in jaxreid (`jaxreid.FeatureExtractor`) and in
plain PyTorch. The labelled twin is `configs/msmt2market.py` with
the same seed (experiments/real_adaptation.sh).

Usage: python experiments/unlabelled_market.py --market=../shared/data/market1501 \
           --workdir=runs/real/unlabelled_abmt_s1 [--seed=1] [--preset=configs/folder.py]
Results: <workdir>/unlabelled_market.json and the printed table (experiments/results_real.md).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unlabelled_copy(market_train: str, out: str, seed: int) -> int:
  """Copies every image of `market_train` to out/<camera>/<random hex>.jpg (no identity left in
  the name or the folder); returns the number of images."""
  names = sorted(n for n in os.listdir(market_train) if n.endswith('.jpg'))
  rng = np.random.default_rng(seed)
  for name in names:
    camera = name.split('_')[1][:2]  # 'c3' of '0002_c3s1_000451_03.jpg'
    os.makedirs(os.path.join(out, camera), exist_ok=True)
    shutil.copyfile(
        os.path.join(market_train, name), os.path.join(out, camera, f'{rng.bytes(8).hex()}.jpg')
    )
  return len(names)


def torch_market_map(pth: str, market: str, height: int, width: int, batch: int = 64) -> dict:
  """Market protocol for a torchreid OSNet file, run in PyTorch with torchreid's preprocessing."""
  import torch

  sys.path.insert(0, REPO)
  from jaxreid import retrieval
  from jaxreid.data import load_dataset
  from tests import torch_reference as tr

  sd = torch.load(pth, weights_only=True)
  net = tr.osnet_x0_25(num_classes=sd['classifier.weight'].shape[0])
  net.load_state_dict(sd, strict=True)
  net.eval()
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

  def features(paths):
    out = []
    for s in range(0, len(paths), batch):
      x = np.stack(
          [
              np.asarray(Image.open(p).convert('RGB').resize((width, height), Image.BILINEAR))
              for p in paths[s : s + batch]
          ]
      )
      x = ((x / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
      with torch.no_grad():
        f = net(torch.from_numpy(np.ascontiguousarray(x))).numpy()
      out.append(f / np.linalg.norm(f, axis=1, keepdims=True))
    return np.concatenate(out)

  ds = load_dataset('market1501', market)
  ids = (ds.query.pids, ds.gallery.pids, ds.query.camids, ds.gallery.camids)
  return retrieval.market_metrics(features(ds.query.paths), features(ds.gallery.paths), *ids)


def jaxreid_market_map(pth: str, market: str) -> dict:
  """Market protocol for the exported file read back by jaxreid's Python API (torchreid's
  preprocessing, `jaxreid.FeatureExtractor`): the same network and resize as `torch_market_map`."""
  sys.path.insert(0, REPO)
  import jaxreid
  from jaxreid.evaluator import Evaluator

  evaluator = Evaluator.load('market1501', market)
  return evaluator.run_model(jaxreid.load_model(pth), batch_size=64, interpolation='bilinear')[0]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--market', required=True, help='Market-1501 (its bounding_box_train/ is copied)')
  p.add_argument('--workdir', required=True)
  p.add_argument('--seed', type=int, default=1)
  p.add_argument('--preset', default='configs/folder.py')
  p.add_argument('extra', nargs='*', help='more --config.* flags for the run')
  args = p.parse_args()
  py = sys.executable
  record = {'preset': args.preset, 'seed': args.seed}
  with tempfile.TemporaryDirectory(prefix='unlabelled_market_') as crops:
    n = unlabelled_copy(os.path.join(args.market, 'bounding_box_train'), crops, args.seed)
    print(f'unlabelled copy: {n} images in {crops}', flush=True)
    t0 = time.time()
    subprocess.run(
        [
            py,
            '-m',
            'jaxreid.main',
            f'--config={args.preset}',
            f'--config.data.target_root={crops}',
            f'--config.seed={args.seed}',
            f'--workdir={args.workdir}',
            *args.extra,
        ],
        check=True,
        cwd=REPO,
    )
    record['run_seconds'] = time.time() - t0
  t0 = time.time()
  # jaxreid: the run's model (ABMT: both branches' joint feature), training's bicubic resize.
  ours = subprocess.run(
      [
          py,
          '-m',
          'jaxreid.tools.evaluate',
          f'--model={args.workdir}',
          '--data=market1501',
          f'--data_root={args.market}',
          f'--export_features={os.path.join(args.workdir, "market_eval")}',
      ],
      check=True,
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  print(ours.stdout, flush=True)
  with open(os.path.join(args.workdir, 'market_eval', 'results.json')) as f:
    record['jaxreid'] = json.load(f)
  config = json.load(open(os.path.join(args.workdir, 'config.json')))
  h, w = config['data']['height'], config['data']['width']
  pth = os.path.join(args.workdir, 'model.pth')
  record['jaxreid_export'] = jaxreid_market_map(pth, args.market)
  record['pytorch_export'] = torch_market_map(pth, args.market, h, w)
  record['evaluate_seconds'] = time.time() - t0
  with open(os.path.join(args.workdir, 'unlabelled_market.json'), 'w') as f:
    json.dump(record, f, indent=2, default=float)
  for name in ('jaxreid', 'jaxreid_export', 'pytorch_export'):
    r = record[name]
    print(f'{name:16s} mAP {r["mAP"]:.2f} top1 {r["top1"]:.2f} top5 {r["top5"]:.2f}')
  print(f'run {record["run_seconds"] / 60:.1f} min, evaluation {record["evaluate_seconds"]:.0f} s')


if __name__ == '__main__':
  main()
