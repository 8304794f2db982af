"""Where a CPU training step spends its time, jaxreid against PyTorch: a sampled native profile.

XLA:CPU's thunks are not covered by jax.profiler's per-op tables, so both sides are sampled from
outside while a worker runs the same step over and over after its warm-up: with `perf` (default;
every thread, which matters because XLA runs its kernels on threads of its own) or with py-spy
(`--native`, Python threads only). Every sample is attributed to a kind of work (XLA's
JIT-compiled fusions, YNNPACK / oneDNN / Eigen kernels, the Linux kernel's page handling,
allocation...), and the shares are printed side by side.

  python experiments/benchmarks/profile_cpu_step.py --backbone=osnet_x0_25 --size=256x128x16
  python experiments/benchmarks/profile_cpu_step.py --backbone=resnet --size=128x64x32 --seconds=40

Needs perf (Debian: linux-perf) or py-spy (`pip install py-spy`), and torch (the PyTorch side: tests/torch_reference.py and
the ResNet-50 of tests/test_convert.py, as experiments/benchmarks/bench_cpu_vs_torch.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (kind, regex on a native or Python frame name), first match from the leaf wins.
KINDS = (
    ('oneDNN / MKL-DNN kernels', r'dnnl|mkldnn|jit_avx|jit_uni|brgemm|onednn'),
    ('XNNPACK / YNNPACK kernels', r'xnn_|xnnpack|ynn::'),
    (
        'Eigen convolution',
        r'SpatialConvolution|TensorConvolution|EigenConv|conv2d.*eigen|ConvolutionThunk',
    ),
    ('Eigen / BLAS matrix product', r'TensorContraction|gemm|Gemm|sgemm|GEBP|gebp|DotThunk|matmul'),
    ('XLA fused kernels (elementwise, reductions)', r'fusion|Fusion|KernelThunk|__xla_|_kernel'),
    ('copies and transposes', r'memcpy|memmove|Copy|copy|Transpose|transpose'),
    ('allocation', r'malloc|free|alloc|mmap|munmap'),
    (
        'threads waiting / scheduling',
        r'futex|pthread_cond|sched_yield|WaitFor|Barrier|Notification',
    ),
    ('PyTorch ATen (other)', r'at::native|at::|c10::'),
    ('PyTorch autograd engine', r'torch::autograd|autograd'),
    ('Python interpreter', r'_PyEval|PyObject|Py_'),
)


def classify(stack: list[str]) -> str:
  for frame in reversed(stack):  # leaf first
    for kind, pattern in KINDS:
      if re.search(pattern, frame):
        return kind
  return 'other'


def classify_perf(dso: str, sym: str) -> str:
  """A perf sample's kind from its shared object and symbol (XLA's JIT code has no symbols)."""
  if dso.startswith('[JIT]'):
    return 'XLA JIT-compiled kernels (fusions, elementwise, reductions)'
  if dso.startswith('[kernel'):
    return 'Linux kernel (page faults, page zeroing, scheduling)'
  if dso.startswith('libgomp'):  # OpenMP workers spinning while they wait for work (PyTorch)
    return 'threads waiting / scheduling'
  return classify([sym])


def sample_perf(pid: int, seconds: int, rate: int, raw_dir: str) -> collections.Counter:
  """Shares (percent) of every thread's samples by kind, from `perf record` / `perf report`."""
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(raw_dir or tmp, f'perf_{pid}.data')
    subprocess.run(
        [
            'perf',
            'record',
            '-F',
            str(rate),
            '-p',
            str(pid),
            '-o',
            data,
            '--',
            'sleep',
            str(seconds),
        ],
        check=True,
        capture_output=True,
    )
    report = subprocess.run(
        [
            'perf',
            'report',
            '-i',
            data,
            '--no-children',
            '--sort',
            'dso,sym',
            '--stdio',
            '-g',
            'none',
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
  counts = collections.Counter()
  for line in report.splitlines():  # "  5.68%  libjax_common.so  [.] ynn::multiply..."
    m = re.match(r'\s*([\d.]+)%\s+(\S+(?: tid \d+)?)\s+\[.\]\s+(.*)', line)
    if m:
      counts[classify_perf(m.group(2), m.group(3))] += float(m.group(1))
  return counts


def torch_step(backbone: str, h: int, w: int, b: int, threads: int = 2):
  """The PyTorch step (one network, CE + batch-hard softmax triplet, Adam) as a closure."""
  sys.path.insert(0, REPO)
  import torch

  from experiments.benchmarks import bench_cpu_vs_torch as bench

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  net = bench._torch_net(backbone, 'resnet')
  opt = torch.optim.Adam(net.parameters(), lr=3.5e-4, weight_decay=5e-4)
  x, y = torch.randn(b, 3, h, w), torch.arange(b) // 4

  def step():
    net.train()
    ((f, z),) = net(x)
    d = torch.cdist(f, f)
    same = y[:, None] == y[None]
    tri = torch.nn.functional.softplus(
        (d * same).max(1).values - (d + 1e5 * same).min(1).values
    ).mean()
    loss = torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1) + tri
    opt.zero_grad()
    loss.backward()
    opt.step()

  return step


def jax_step_parts(backbone: str, h: int, w: int, b: int, method_name: str = 'cluster_baseline'):
  """jaxreid's same step: by default the clustering baseline's (one network, CE + softmax
  triplet, no BN pass), returned as (step_fn, args, variables, mesh) for `make_train_chunk` or
  `jax.jit`; `method_name` builds another method's step (its networks from different seeds)."""
  import jax
  import numpy as np

  from jaxreid import methods
  from jaxreid import models
  from jaxreid import numpy_init
  from jaxreid import train

  method = methods.get(method_name)
  arch = {'arch': 'abmt'} if method.arch == 'abmt' else {}
  model = models.create_model(dict(backbone=backbone, depth=50, width=64, num_classes=512, **arch))
  mesh = train.make_mesh()
  tx = train.make_optimizer(3.5e-4)
  students = [numpy_init.init_variables(model, i) for i in range(method.num_students)]
  variables = students[0]
  state = train.replicate(
      train.create_train_state(method, students, tx, jax.random.PRNGKey(0)), mesh
  )
  rng = np.random.default_rng(0)
  n = 4 * b
  data = train.replicate(
      train.EpochData(
          images=rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
          labels=(np.arange(n) // 4 % 512).astype(np.int32),
          class_mask=models.class_mask(n // 4, 512),
          target_images=np.zeros((1, h, w, 3), np.uint8),
      ),
      mesh,
  )
  idx = rng.permutation(n)[:b].astype(np.int32)
  step_fn = train.make_train_step(method, model, tx, erasing_prob=0.0, mesh=mesh)
  return step_fn, (state, data, idx, idx), variables, mesh


def worker(args) -> None:
  """Runs the step forever (until killed), after a warm-up; prints READY when profiling may start."""
  h, w, b = (int(v) for v in args.size.split('x'))
  if args.side == 'torch':
    step = torch_step(args.backbone, h, w, b)
  else:
    from jaxreid import host_memory

    if args.keep_memory == 'before':
      host_memory.keep_freed_memory()
    import jax

    jax.devices()
    if args.keep_memory == 'after':  # once JAX's CPU client and its threads exist
      host_memory.keep_freed_memory()

    from jaxreid import train

    step_fn, (state, data, idx, _), _, mesh = jax_step_parts(args.backbone, h, w, b)
    chunk = train.make_train_chunk(step_fn, mesh)
    idx = idx[None]

    def step():
      nonlocal state
      state, m = chunk(state, data, idx, idx)
      jax.block_until_ready(m)

  step()
  step()
  if args.timed:  # step time and page faults, e.g. to compare allocators / XLA flags
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(args.timed):
      step()
    ms = 1000 * (time.perf_counter() - t0) / args.timed
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.timed
    # Each minor fault hands the process one fresh (zeroed) 4 KiB page.
    print(
        f'{args.side} {args.backbone} {args.size}: {ms:.0f} ms/step, {faults:,.0f} page faults'
        f'/step ({faults * 4096 / 2**20:,.0f} MiB of fresh pages)'
    )
    return
  print('READY', flush=True)
  while True:
    step()


def profile(args, side: str) -> collections.Counter:
  cmd = [
      sys.executable,
      __file__,
      '--worker',
      f'--side={side}',
      f'--backbone={args.backbone}',
      f'--size={args.size}',
  ]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:
      if line.startswith('READY'):
        break
    if args.profiler == 'perf':  # shares in percent, whatever the sample count
      return sample_perf(proc.pid, args.seconds, args.rate, args.raw_dir)
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(args.raw_dir or tmp, f'{side}_raw.txt')
      subprocess.run(
          [
              'py-spy',
              'record',
              '--native',
              '--rate',
              str(args.rate),
              '--format',
              'raw',
              '--duration',
              str(args.seconds),
              '--pid',
              str(proc.pid),
              '--output',
              out,
          ],
          check=True,
          capture_output=True,
      )
      counts = collections.Counter()
      with open(out) as f:
        for line in f:  # "frame;frame;...;leaf count"
          stack, _, n = line.rstrip().rpartition(' ')
          counts[classify(stack.split(';'))] += int(n)
      return counts
  finally:
    proc.kill()
    proc.wait()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--backbone', default='osnet_x0_25')
  p.add_argument('--size', default='256x128x16', help='HEIGHTxWIDTHxBATCH')
  p.add_argument('--seconds', type=int, default=30)
  p.add_argument('--rate', type=int, default=50)
  p.add_argument('--raw_dir', default='', help='keep the raw py-spy samples here')
  p.add_argument('--sides', default='jax,torch')
  p.add_argument(
      '--profiler',
      default='perf',
      choices=('perf', 'py-spy'),
      help='perf samples every thread (XLA runs on its own threads); py-spy only Python threads',
  )
  p.add_argument('--worker', action='store_true')
  p.add_argument('--timed', type=int, default=0, help='with --worker: time this many steps')
  p.add_argument('--side', default='jax')
  p.add_argument(
      '--keep_memory',
      default='none',
      choices=('none', 'before', 'after'),
      help="jax side: host_memory.keep_freed_memory() before / after JAX's CPU client exists",
  )
  args = p.parse_args()
  if args.worker:
    return worker(args)
  t0 = time.time()
  result = {side: profile(args, side) for side in args.sides.split(',')}
  result = {s: result.get(s, collections.Counter()) for s in ('jax', 'torch')}
  kinds = sorted(set(result['jax']) | set(result['torch']), key=lambda k: -result['jax'][k])
  totals = {s: max(1, sum(c.values())) for s, c in result.items()}
  print(
      f'\n{args.backbone} {args.size}, {args.seconds} s sampled per side at {args.rate} Hz '
      f'({args.profiler}), {time.time() - t0:.0f} s in all'
  )
  print('| kind of work | jaxreid share | PyTorch share |')
  print('|---|---|---|')
  for k in kinds:
    print(
        f'| {k} | {100 * result["jax"][k] / totals["jax"]:.1f}% | '
        f'{100 * result["torch"][k] / totals["torch"]:.1f}% |'
    )


if __name__ == '__main__':
  main()
