"""Does an exported model rank like jaxreid in PyTorch? Exports a finished run to torchreid's
OSNet layout (`jaxreid.export`), loads it with `strict=True` into the plain-PyTorch copy of
torchreid's OSNet (tests/torch_reference.py, the architecture tested equal to torchreid's), extracts
the query and gallery features in PyTorch, and scores them with the Market protocol.

Usage: python experiments/check_export.py --run=WORKDIR --data_root=../shared/data/market1501
Prints the run's own result (results.json) beside the PyTorch one. With the OSNet head
'fc_pre_bn' they should agree to float rounding; with the default 'bnneck' the file's feature is
the fc embedding, the input of jaxreid's BN neck (docs/reference.md section 9), so the two can
differ a little (for ABMT, the run's result is also the joint two-branch one: compare its
`avg/mAP`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--run', required=True)
  p.add_argument('--data_root', required=True)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--batch', type=int, default=64)
  args = p.parse_args()
  import torch

  sys.path.insert(0, REPO)
  from jaxreid import input_pipeline
  from jaxreid import retrieval
  from jaxreid.data import load_dataset
  from tests import torch_reference as tr

  torch.set_num_threads(args.threads)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'model.pth')
    subprocess.run(
        [
            sys.executable,
            '-m',
            'jaxreid.tools.export',
            f'--model={args.run}',
            '--format=torchreid',
            f'--out={out}',
        ],
        check=True,
        cwd=REPO,
    )
    sd = torch.load(out, weights_only=True)
  config = json.load(open(os.path.join(args.run, 'config.json')))
  net = getattr(tr, config['model']['backbone'])(num_classes=sd['classifier.weight'].shape[0])
  net.load_state_dict(sd, strict=True)
  net.eval()
  ds = load_dataset('market1501', args.data_root)
  h, w = config['data']['height'], config['data']['width']

  def features(paths):
    out = []
    for s in range(0, len(paths), args.batch):
      x = np.asarray(
          input_pipeline.normalize(
              input_pipeline.decode_images(paths[s : s + args.batch], h, w, progress=False)
          )
      )
      with torch.no_grad():
        f = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
      out.append(f / np.linalg.norm(f, axis=1, keepdims=True))
    return np.concatenate(out)

  qf, gf = features(ds.query.paths), features(ds.gallery.paths)
  res = retrieval.market_metrics(
      qf, gf, ds.query.pids, ds.gallery.pids, ds.query.camids, ds.gallery.camids
  )
  own = json.load(open(os.path.join(args.run, 'results.json')))
  adapted = next(v for k, v in own.items() if k.endswith('(adapted)'))
  print(f'jaxreid run:      mAP {adapted["mAP"]:.2f} top1 {adapted["top1"]:.2f}')
  print(f'PyTorch (export): mAP {res["mAP"]:.2f} top1 {res["top1"]:.2f}')


if __name__ == '__main__':
  main()
