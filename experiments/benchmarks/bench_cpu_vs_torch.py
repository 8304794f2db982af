"""jaxreid vs a PyTorch step of the same work, on this CPU, measured in one run (issues 7, 16).

PyTorch side, random init, `--threads` threads, in the layouts the conversion parity tests check
(ResNet-50 as in MMT's reference, tests/test_convert.py; torchreid's OSNet and torchvision's
MobileNetV2 with last stride 1, tests/torch_reference.py), each with the re-ID head jaxreid uses
(BN neck + bias-free classifier; OSNet: torchreid's fc + BN + ReLU) and ABMT's two branches:
  pretrain: source forward + backward (CE + batch-hard softmax triplet) + Adam step, plus the
            no-grad train-mode target forward that updates BN statistics;
  mmt:      two students forward + backward (CE, triplet, soft CE against the other teacher),
            two EMA teachers forward (no grad), EMA update;
  abmt:     one two-branch student forward + backward (CE and triplet per branch, soft CE against
            the teacher's other branch), its EMA teacher forward (no grad), EMA update.
The loss terms differ in small details from jaxreid's (e.g. no soft triplet); their cost is
negligible next to the networks'. jaxreid side: `python -m jaxreid.tools.benchmark` (the trainer's own
step) in a subprocess, optionally under several XLA_FLAGS settings.

Usage:
  python experiments/benchmarks/bench_cpu_vs_torch.py  # every backbone, method and size (~1 h here)
  python experiments/benchmarks/bench_cpu_vs_torch.py --backbones=osnet_x0_25 --sizes=128x64x32 \
      --methods=abmt --xla_flags="" --xla_flags="--xla_cpu_use_onednn=true" --json=out.json
Prints a markdown table with img/s for both and the ratio; `--json` writes the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _torch_trunk(backbone: str):
  """(shared stages, last stage, ABMT's extra block, feature width) in PyTorch,
  the layouts the conversion parity tests check: ResNet-50 as in MMT's reference
  (tests/test_convert.py), torchreid's OSNet and torchvision's MobileNetV2 with last stride 1
  (tests/torch_reference.py). The last stage is the one ABMT duplicates (models.branch_stage)."""
  import torch

  if backbone == 'resnet':
    from tests.test_convert import TBottleneck
    from tests.test_convert import TResNet

    r = TResNet(50)
    base = torch.nn.Sequential(*r.stem(), r.layer1, r.layer2, r.layer3)
    return base, r.layer4, TBottleneck(r.dim, r.dim // 4), r.dim
  from tests import torch_reference as tr

  if backbone == 'mobilenetv2':
    f = tr.set_last_stride_1(tr.mobilenet_v2()).features
    last = torch.nn.Sequential(*f[14:])
    return torch.nn.Sequential(*f[:14]), last, tr.InvertedResidual(320, 320, 1, 6), 1280
  n = getattr(tr, backbone)(num_classes=512, loss='triplet')
  last = torch.nn.Sequential(n.conv4, n.conv5)
  c = n.conv5.conv.out_channels
  return torch.nn.Sequential(n.conv1, n.maxpool, n.conv2, n.conv3), last, tr.OSBlock(c, c), c


def _torch_net(backbone: str, arch: str):
  """A PyTorch re-ID network whose train forward returns [(f, logits)] per branch: one branch
  (`arch='resnet'`, MMT's layout) or ABMT's avg + max branches (`arch='abmt'`: a copy of the last
  stage plus the extra block, max pooling; docs/reference.md section 1)."""
  import copy

  import torch

  base, last, extra, dim = _torch_trunk(backbone)

  class Head(torch.nn.Module):
    """f -> BN neck (bias frozen) -> classifier, where f is the pooled feature (ResNet /
    MobileNetV2) or torchreid's fc embedding (OSNet: Linear + BN + ReLU; jaxreid's head 'bnneck').
    """

    def __init__(self):
      super().__init__()
      width = dim
      self.fc = torch.nn.Identity()
      if backbone.startswith('osnet'):
        width = 512
        self.fc = torch.nn.Sequential(
            torch.nn.Linear(dim, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU()
        )
      self.neck = torch.nn.BatchNorm1d(width)
      self.neck.bias.requires_grad_(False)
      self.classifier = torch.nn.Linear(width, 512, bias=False)

    def forward(self, pooled):
      f = self.fc(pooled)
      return f, self.classifier(self.neck(f))

  class Net(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.base, self.avg_branch, self.avg_head = base, last, Head()
      if arch == 'abmt':
        if backbone == 'mobilenetv2':  # the extra block goes before the 1x1 conv to 1280
          copied = copy.deepcopy(last)
          self.max_branch = torch.nn.Sequential(*copied[:-1], extra, copied[-1])
        else:
          self.max_branch = torch.nn.Sequential(copy.deepcopy(last), extra)
        self.max_head = Head()

    def forward(self, x):
      t = self.base(x)
      out = [self.avg_head(self.avg_branch(t).mean((2, 3)))]
      if arch == 'abmt':
        out.append(self.max_head(self.max_branch(t).amax((2, 3))))
      return out

  return Net()


def torch_step_rate(
    method: str,
    height: int,
    width: int,
    batch: int,
    steps: int,
    threads: int,
    backbone: str = 'resnet',
    device: str = 'cpu',
    dtype: str = 'float32',
) -> float:
  """Images per second of the PyTorch step of `method` (pretrain | mmt | abmt), as described in
  the module docstring; `dtype='bfloat16'` runs the forward passes under autocast (AMP)."""
  import contextlib

  import torch
  import torch.nn.functional as F

  sys.path.insert(0, REPO)
  torch.set_num_threads(threads)
  torch.backends.cudnn.benchmark = True  # as the MMT / ABMT reference code sets it
  torch.manual_seed(0)
  arch = 'abmt' if method == 'abmt' else 'resnet'
  nets = [_torch_net(backbone, arch).to(device) for _ in range(2 if method == 'mmt' else 1)]
  teachers = [_torch_net(backbone, arch).to(device) for _ in nets] if method != 'pretrain' else []
  for t, s in zip(teachers, nets):
    t.load_state_dict(s.state_dict())
    for p in t.parameters():
      p.requires_grad_(False)
  params = [p for n in nets for p in n.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=3.5e-4, weight_decay=5e-4)
  x = torch.randn(batch, 3, height, width, device=device)
  y = torch.arange(batch, device=device) // 4
  amp = lambda: (
      torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
      if dtype == 'bfloat16'
      else contextlib.nullcontext()
  )
  sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)

  def triplet(f):  # losses in float32, as jaxreid computes them
    d = torch.cdist(f.float(), f.float())
    same = y[:, None] == y[None]
    ap = (d * same).max(1).values
    an = (d + 1e5 * same).min(1).values
    return F.softplus(ap - an).mean()

  def soft_ce(z, zt):
    return -(F.softmax(zt.float(), 1) * F.log_softmax(z.float(), 1)).sum(1).mean()

  def step():
    for n in nets + teachers:
      n.train()
    with amp():
      outs = [net(x) for net in nets]
      with torch.no_grad():
        touts = [t(x) for t in teachers]
        if method == 'pretrain':
          nets[0](x)  # the target batch's no-grad BN pass
    loss = 0.0
    for out in outs:
      for f, z in out:
        loss = loss + F.cross_entropy(z, y, label_smoothing=0.1) + triplet(f)
    if method == 'mmt':  # student i against the other teacher
      for ((_, z),), ((_, zt),) in zip(outs, touts[::-1]):
        loss = loss + soft_ce(z, zt)
    if method == 'abmt':  # each branch against the teacher's other branch
      (_, za), (_, zm) = outs[0]
      (_, ta), (_, tm) = touts[0]
      loss = loss + soft_ce(za, tm) + soft_ce(zm, ta)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
      for t, s in zip(teachers, nets):
        for pt, ps in zip(t.parameters(), s.parameters()):
          pt.mul_(0.999).add_(ps, alpha=0.001)

  for _ in range(2 if device == 'cpu' else 5):  # warm-up (GPU: cuDNN's algorithm search)
    step()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  return batch * steps / (time.perf_counter() - t0)


def jax_step_rate(
    method: str,
    height: int,
    width: int,
    batch: int,
    steps: int,
    xla_flags: str,
    backbone: str = 'resnet',
    dtype: str = 'float32',
) -> float | None:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'bench.json')
    env = dict(os.environ, XLA_FLAGS=xla_flags)
    cmd = [
        sys.executable,
        '-m',
        'jaxreid.tools.benchmark',
        f'--methods={method}',
        f'--dtypes={dtype}',
        '--depth=50',
        '--width=64',
        f'--backbone={backbone}',
        f'--height={height}',
        f'--img_width={width}',
        f'--batch={batch}',
        f'--steps={steps}',
        '--train_images=256',
        '--test_images=64',
        f'--out={out}',
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
  p.add_argument('--methods', default='pretrain,mmt,abmt')
  p.add_argument(
      '--backbones',
      default='resnet,osnet_x0_25,mobilenetv2',
      help='comma-separated: resnet (ResNet-50), osnet_x1_0 .. osnet_x0_25, mobilenetv2',
  )
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument(
      '--xla_flags',
      action='append',
      default=None,
      help='XLA_FLAGS values to compare for jaxreid (repeatable; default: as set)',
  )
  p.add_argument('--device', default='cpu', help="PyTorch's device: cpu or cuda (a GPU run)")
  p.add_argument(
      '--dtype',
      default='float32',
      help='float32, or bfloat16 (jaxreid: --config.model.dtype; PyTorch: autocast, i.e. AMP)',
  )
  p.add_argument('--json', default='', help='also write the rows to this JSON file')
  args = p.parse_args()
  variants = args.xla_flags or [os.environ.get('XLA_FLAGS', '')]
  rows = []
  for size in args.sizes.split(','):
    h, w, b = (int(v) for v in size.split('x'))
    for backbone in args.backbones.split(','):
      for method in args.methods.split(','):
        t = torch_step_rate(
            method, h, w, b, args.steps, args.threads, backbone, args.device, args.dtype
        )
        for flags in variants:
          j = jax_step_rate(method, h, w, b, args.steps, flags, backbone, args.dtype)
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
  if args.json:
    keys = ('backbone', 'size', 'batch', 'method', 'xla_flags', 'torch_img_s', 'jaxreid_img_s')
    with open(args.json, 'w') as f:
      json.dump(
          {
              'threads': args.threads,
              'device': args.device,
              'dtype': args.dtype,
              'steps': args.steps,
              'rows': [dict(zip(keys, r), ratio=(r[6] / r[5]) if r[6] else None) for r in rows],
          },
          f,
          indent=1,
      )


if __name__ == '__main__':
  main()
