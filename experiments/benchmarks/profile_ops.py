"""Per-operation time of one training step on this CPU, jaxreid against PyTorch, by kind of layer.

jaxreid: `jax.profiler` traces the compiled step; every executed HLO instruction (XLA:CPU thunk)
is attributed through the compiled module's metadata to the layer it came from (convolution or
matrix product, depthwise convolution, BatchNorm, the rest) and to the forward or backward pass
(`transpose(jvp(...))` in its op name). PyTorch: `torch.profiler` over the same steps, operators'
self time, backward where an autograd node is an ancestor. Layout copies and transposes are a
kind of their own on both sides: XLA:CPU inserts them around convolution gradients.

The step is experiments/benchmarks/profile_cpu_step.py's: one network (the clustering baseline's),
CE + batch-hard softmax triplet, Adam; random init, random images.

  python experiments/benchmarks/profile_ops.py --backbone=resnet --size=256x128x16
  python experiments/benchmarks/profile_ops.py --backbone=osnet_x0_25 --size=256x128x16 --top=20

XLA runs independent thunks on several threads at once, so its per-kind sums can exceed the wall
time of a step; both are printed. Needs torch for the PyTorch side (`--sides=jax` without).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

_BN = re.compile(r'/(bn\w*|\w*_bn|norm\w*|IN|neck\w*|BatchNorm\w*)/', re.I)
_LAYOUT = re.compile(r'^(transpose|copy)')


def kind_of(direction: str, op_name: str, opcodes: set[str], name: str, depthwise: list[str]):
  """The kind of layer work an HLO instruction (or fusion) does."""
  if _LAYOUT.match(name) or opcodes <= {'copy', 'transpose', 'bitcast', 'reshape', 'parameter'}:
    return 'layout copies / transposes'
  if any(f'/{path}/' in op_name for path in depthwise):
    return f'depthwise conv ({direction})'
  if opcodes & {'convolution', 'dot'}:
    return f'conv / matmul ({direction})'
  if _BN.search(op_name):
    return f'BatchNorm ({direction})'
  if not op_name:
    return 'unattributed (no metadata)'
  if 'ReIDNet' not in op_name:
    return 'optimizer, loss, other'
  return f'elementwise, pooling ({direction})'


def attribute(name: str, index: dict, depthwise: list[str]) -> tuple[str, str]:
  """(kind of work, op_name) of the executed instruction `name` of an indexed HLO module."""
  ops, op_name = index.get(name, ({'?'}, ''))
  # XLA keeps the metadata of forward convolutions; the kernel-gradient convolutions it rewrites
  # (batch = input channels) come without any, so a nameless one is a backward one.
  backward = 'transpose(' in op_name or (not op_name and ops & {'convolution', 'dot'})
  return kind_of('backward' if backward else 'forward', op_name, ops, name, depthwise), op_name


def hlo_index(text: str) -> dict[str, tuple[set[str], str]]:
  """instruction name -> (opcodes it runs, first op_name found), fusions through their body."""
  bodies: dict[str, tuple[set[str], str]] = {}
  current = None
  entries = {}
  for line in text.splitlines():
    head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$', line)
    if head:
      current = head.group(1)
      bodies[current] = (set(), '')
      continue
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(', line)
    if not m or current is None:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    op_name = op.group(1) if op else ''
    ops, first = bodies[current]
    ops.add(m.group(2))
    bodies[current] = (ops, first or op_name)
    calls = re.search(r'calls=%?([\w.\-]+)', line)
    entries[m.group(1)] = (m.group(2), op_name, calls.group(1) if calls else None)
  index = {}
  for name, (opcode, op_name, calls) in entries.items():
    ops, body_name = bodies.get(calls, ({opcode}, '')) if calls else ({opcode}, '')
    index[name] = (ops, op_name or body_name)
  return index


def profile_jax(backbone: str, h: int, w: int, b: int, steps: int, top: int):
  from flax import traverse_util
  import jax

  from experiments.benchmarks import profile_cpu_step
  from experiments.benchmarks import summarise_trace

  step_fn, (state, data, idx, _), variables, _ = profile_cpu_step.jax_step_parts(backbone, h, w, b)
  flat = traverse_util.flatten_dict(variables['params'])
  depthwise = [
      '/'.join(k[:-1])
      for k, v in flat.items()
      if k[-1] == 'kernel' and v.ndim == 4 and v.shape[2] == 1 and v.shape[3] > 1
  ]
  compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(state, data, idx, idx).compile()
  index = hlo_index(compiled.as_text())
  for _ in range(2):
    state, m = compiled(state, data, idx, idx)
  jax.block_until_ready(m)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(steps):
        state, m = compiled(state, data, idx, idx)
      jax.block_until_ready(m)
      wall = (time.perf_counter() - t0) / steps * 1e3
    events, _ = summarise_trace.load_events(tmp)
  by_kind, by_op = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get('args', {}).get('hlo_op')  # XLA:CPU thunks carry the HLO instruction they run
    if not name:
      continue
    kind, op_name = attribute(name, index, depthwise)
    by_kind[kind] += e['dur'] / 1e3 / steps
    by_op[(name, kind, op_name)] += e['dur'] / 1e3 / steps
  return wall, by_kind, by_op.most_common(top)


def profile_torch(backbone: str, h: int, w: int, b: int, steps: int, threads: int):
  import torch

  from experiments.benchmarks import profile_cpu_step

  step = profile_cpu_step.torch_step(backbone, h, w, b, threads)
  for _ in range(2):
    step()
  with torch.profiler.profile(
      activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
  ) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
      step()
    wall = (time.perf_counter() - t0) / steps * 1e3
  by_kind = collections.Counter()
  for e in prof.events():
    if e.name.startswith(('autograd::engine', 'Optimizer.', 'ProfilerStep')):
      continue
    parent, backward, optim = e.cpu_parent, False, False
    while parent is not None:
      backward |= parent.name.startswith('autograd::engine::evaluate_function')
      optim |= parent.name.startswith('Optimizer.step')
      parent = parent.cpu_parent
    direction = 'backward' if backward else 'forward'
    name = e.name
    shapes = getattr(e, 'input_shapes', None) or []
    if optim:
      kind = 'optimizer, loss, other'
    elif re.search(r'copy_|contiguous|clone|to_dense|_to_copy|transpose|permute', name):
      kind = 'layout copies / transposes'
    elif 'conv' in name:
      # A depthwise weight is (C, 1, k, k): an input of the forward and the backward op alike.
      depth = any(len(t) == 4 and t[1] == 1 and t[2] > 1 for t in shapes)
      kind = f'{"depthwise conv" if depth else "conv / matmul"} ({direction})'
    elif re.search(r'\b(aten::)?(mm|addmm|bmm|matmul|linear)\b', name):
      kind = f'conv / matmul ({direction})'
    elif 'batch_norm' in name:
      kind = f'BatchNorm ({direction})'
    elif re.search(r'cdist|cross_entropy|softplus|log_softmax|nll|max|min', name):
      kind = 'optimizer, loss, other'
    else:
      kind = f'elementwise, pooling ({direction})'
    by_kind[kind] += e.self_cpu_time_total / 1e3 / steps
  return wall, by_kind


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--backbone', default='resnet')
  p.add_argument('--size', default='256x128x16', help='HEIGHTxWIDTHxBATCH')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--threads', type=int, default=2, help="PyTorch's intra-op threads")
  p.add_argument('--sides', default='jax,torch')
  p.add_argument('--top', type=int, default=12, help="jaxreid's most expensive instructions")
  p.add_argument(
      '--pointwise_impl',
      default='auto',
      choices=('auto', 'xla', 'dot'),
      help="jaxreid's 1x1 convolutions in the layers that allow the product (layers.conv_general)",
  )
  args = p.parse_args()
  from jaxreid import layers

  layers.conv_general.__kwdefaults__['pointwise_impl'] = args.pointwise_impl  # before tracing
  h, w, b = (int(v) for v in args.size.split('x'))
  sides = args.sides.split(',')
  t0 = time.time()
  results, top = {}, []
  if 'jax' in sides:
    wall, kinds, top = profile_jax(args.backbone, h, w, b, args.steps, args.top)
    results['jax'] = (wall, kinds)
  if 'torch' in sides:
    results['torch'] = profile_torch(args.backbone, h, w, b, args.steps, args.threads)
  empty = (0.0, collections.Counter())
  jx, pt = results.get('jax', empty), results.get('torch', empty)
  print(
      f'\n{args.backbone} {args.size}, pointwise_impl={args.pointwise_impl}, '
      f'{args.steps} traced steps per side, '
      f'{time.time() - t0:.0f} s in all (ms per step)\n'
  )
  print('| kind of work | jaxreid | PyTorch |')
  print('|---|---|---|')
  for kind in sorted(set(jx[1]) | set(pt[1]), key=lambda k: -(jx[1][k] + pt[1][k])):
    print(f'| {kind} | {jx[1][kind]:.1f} | {pt[1][kind]:.1f} |')
  print(f'| sum of operator times | {sum(jx[1].values()):.1f} | {sum(pt[1].values()):.1f} |')
  print(f'| wall time of a step | {jx[0]:.1f} | {pt[0]:.1f} |')
  if top:
    print(f'\n| jaxreid: top {len(top)} instructions | kind | ms per step | layer |')
    print('|---|---|---|---|')
    for (name, kind, op_name), ms in top:
      layer = re.sub(r'^jit\(step\)/|conv_general_dilated$', '', op_name)[-60:]
      print(f'| `{name}` | {kind} | {ms:.1f} | {layer} |')


if __name__ == '__main__':
  main()
