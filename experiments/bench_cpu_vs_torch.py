"""jaxreid vs a PyTorch step of the same work, on this CPU, measured in one run (issue 7, item 4).

PyTorch side: the reference's ResNet-50 layout (the test suite's torchvision-layout modules in
tests/test_convert.py, the ones the weight-conversion parity tests use), random init, 2 threads:
  pretrain: source forward + backward (CE + batch-hard softmax triplet) + Adam step, plus the
            no-grad train-mode target forward that updates BN statistics;
  mmt:      two students forward + backward, two EMA teachers forward (no grad), EMA update.
jaxreid side: `python -m jaxreid.benchmark` (the trainer's own step) in a subprocess, optionally
under several XLA_FLAGS settings.

Usage:
  python experiments/bench_cpu_vs_torch.py                       # both sizes, both methods
  python experiments/bench_cpu_vs_torch.py --sizes=128x64x32 --methods=pretrain \
      --xla_flags="" --xla_flags="--xla_cpu_multi_thread_eigen=false"
Prints a markdown table with img/s for both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_net(backbone: str):
  """(f, logits)-returning PyTorch network of the backbone, in its reference layout."""
  import torch

  if backbone == 'resnet':
    from tests.test_convert import TMMT  # the reference layout, as in the parity tests
    from tests.test_convert import TResNet  # the reference layout, as in the parity tests

    return TMMT(TResNet(50), 512)
  from tests import torch_reference as tr

  class TorchreidPair(torch.nn.Module):  # torchreid's loss='triplet' output order is (y, v)

    def __init__(self):
      super().__init__()
      self.net = getattr(tr, backbone)(num_classes=512, loss='triplet')

    def forward(self, x):
      y, v = self.net(x)
      return v, y

  return TorchreidPair()


def torch_step_rate(
    method: str,
    height: int,
    width: int,
    batch: int,
    steps: int,
    threads: int,
    backbone: str = 'resnet',
) -> float:
  import torch

  sys.path.insert(0, REPO)
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  nets = [_torch_net(backbone) for _ in range(2 if method == 'mmt' else 1)]
  teachers = [_torch_net(backbone) for _ in nets] if method == 'mmt' else []
  for t, s in zip(teachers, nets):
    t.load_state_dict(s.state_dict())
    for p in t.parameters():
      p.requires_grad_(False)
  params = [p for n in nets for p in n.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=3.5e-4, weight_decay=5e-4)
  x = torch.randn(batch, 3, height, width)
  y = torch.arange(batch) // 4

  def triplet(f):
    d = torch.cdist(f, f)
    same = y[:, None] == y[None]
    ap = (d * same).max(1).values
    an = (d + 1e5 * same).min(1).values
    return torch.nn.functional.softplus(ap - an).mean()

  def step():
    loss = 0.0
    for net in nets:
      net.train()
      f, z = net(x)
      loss = loss + torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1) + triplet(f)
    with torch.no_grad():
      for t in teachers:
        t.train()
        t(x)
      if method == 'pretrain':
        nets[0](x)  # the target batch's no-grad BN pass
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
      for t, s in zip(teachers, nets):
        for pt, ps in zip(t.parameters(), s.parameters()):
          pt.mul_(0.999).add_(ps, alpha=0.001)

  step()  # warm-up
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  return batch * steps / (time.perf_counter() - t0)


def jax_step_rate(
    method: str,
    height: int,
    width: int,
    batch: int,
    steps: int,
    xla_flags: str,
    backbone: str = 'resnet',
) -> float | None:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'bench.json')
    env = dict(os.environ, XLA_FLAGS=xla_flags)
    cmd = [
        sys.executable,
        '-m',
        'jaxreid.benchmark',
        f'--methods={method}',
        '--dtypes=float32',
        '--depth=50',
        '--width=64',
        f'--backbone={backbone}',
        f'--height={height}',
        f'--img_width={width}',
        f'--batch={batch}',
        f'--steps={steps}',
        '--train_images=256',
        '--test_images=64',
        f'--json={out}',
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(out):
      print(
          f'jaxreid benchmark failed under XLA_FLAGS={xla_flags!r}:\n{proc.stderr[-2000:]}',
          file=sys.stderr,
      )
      return None
    with open(out) as f:
      return json.load(f)['rows'][0]['train_img_s']


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
      '--sizes', default='256x128x16,128x64x32', help='comma-separated HEIGHTxWIDTHxBATCH'
  )
  p.add_argument('--methods', default='pretrain,mmt')
  p.add_argument(
      '--backbones',
      default='resnet',
      help='comma-separated: resnet (ResNet-50), osnet_x0_25, ... (PyTorch side: '
      'tests/torch_reference.py)',
  )
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument(
      '--xla_flags',
      action='append',
      default=None,
      help='XLA_FLAGS values to compare for jaxreid (repeatable; default: as set)',
  )
  args = p.parse_args()
  variants = args.xla_flags or [os.environ.get('XLA_FLAGS', '')]
  rows = []
  for size in args.sizes.split(','):
    h, w, b = (int(v) for v in size.split('x'))
    for backbone in args.backbones.split(','):
      for method in args.methods.split(','):
        t = torch_step_rate(method, h, w, b, args.steps, args.threads, backbone)
        for flags in variants:
          j = jax_step_rate(method, h, w, b, args.steps, flags, backbone)
          rows.append((backbone, f'{h}x{w}', b, method, flags or '(default)', t, j))
          print(
              f'{backbone} {h}x{w} b{b} {method:8s} torch {t:6.2f} img/s  jaxreid '
              f'{j or float("nan"):6.2f} img/s  XLA_FLAGS={flags!r}',
              flush=True,
          )
  print(
      '\n| backbone | size | batch | step | XLA_FLAGS | PyTorch img/s | jaxreid img/s | '
      'jaxreid / PyTorch |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for backbone, size, b, method, flags, t, j in rows:
    ratio = f'{j / t:.2f}' if j else 'failed'
    jtxt = f'{j:.2f}' if j else 'failed'
    print(f'| {backbone} | {size} | {b} | {method} | `{flags}` | {t:.2f} | {jtxt} | {ratio} |')


if __name__ == '__main__':
  main()
