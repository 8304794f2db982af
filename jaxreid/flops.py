"""Forward FLOPs of the models, counted from their traced programs (shapes only), and a table.

`flops_per_image` feeds the benchmark's TFLOP/s and MFU (`jaxreid.benchmark`); `model_report` is
the table `jaxreid-model-report` (`jaxreid.tools.model_report`) prints: parameters, feature
dimension, final map size and GFLOPs of the standard networks at an input size.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxreid import models as models_lib


def _jaxpr_macs(jaxpr) -> int:
  """Multiply-adds of convolutions and matmuls in a (closed) jaxpr, recursing into sub-jaxprs."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec
      per_out = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
      total += math.prod(eqn.outvars[0].aval.shape) * per_out
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
          total += _jaxpr_macs(sub)
  return total


def flops_per_image(
    model, height: int = 256, width: int = 128, train: bool = False, method: str = 'analytic'
) -> float:
  """Forward FLOPs per image (batch 1; train mode uses batch 2 and halves). Shapes only: nothing
  is computed or compiled.

  method='analytic' (default, the convention of published GFLOP numbers): 2 x the multiply-adds of
  every convolution and matmul in the traced program (`jax.make_jaxpr`), padding positions
  included; normalisation, activations and pooling are not counted (< 1 %).
  method='xla': XLA's HLO cost analysis of the lowered, un-optimised program
  (`jax.jit(apply).lower(...).cost_analysis()['flops']`); it counts elementwise ops too but skips
  multiply-adds on padding, so it comes out a few % lower for ResNets.
  """
  variables = models_lib.abstract_variables(model, height, width)
  batch = 2 if train else 1  # training-mode BN needs more than one value per channel at the neck
  x = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
  if train:

    def fn(v, x):
      return model.apply(
          v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)}
      )

  else:

    def fn(v, x):
      return model.apply(v, x, train=False)

  if method == 'analytic':
    flops = 2.0 * _jaxpr_macs(jax.make_jaxpr(fn)(variables, x))
  elif method == 'xla':
    flops = float(jax.jit(fn).lower(variables, x).cost_analysis()['flops'])
  else:
    raise ValueError(f"method must be 'analytic' or 'xla', got {method!r}")
  return flops / batch


REPORT_MODELS = (
    ('ResNet-18', dict(arch='resnet', depth=18)),
    ('ResNet-34', dict(arch='resnet', depth=34)),
    ('ResNet-50', dict(arch='resnet', depth=50)),
    ('ResNet-101', dict(arch='resnet', depth=101)),
    ('IBN-ResNet-50-a', dict(arch='resnet', depth=50, ibn=True)),
    ('ABMT-ResNet-50', dict(arch='abmt', depth=50)),
)


def model_report(
    height: int = 256,
    width: int = 128,
    models: Sequence[tuple[str, dict]] = REPORT_MODELS,
    num_classes: int = 1024,
) -> str:
  """Printable table: parameters (without / with a `num_classes`-wide classifier), eval-output
  dim, final map size and forward GFLOPs per image (`flops_per_image`: analytic 2 x MACs, and
  XLA's cost analysis). `models`: (name, `models.create_model` keywords) pairs."""
  lines = [
      f'Models at {height}x{width} (last stride 1), num_classes={num_classes}',
      f'{"model":<18}{"params (M)":>12}{"+classifier":>13}{"emb dim":>9}{"map":>8}'
      f'{"GFLOPs fwd":>12}{"(XLA)":>9}',
  ]
  for name, kw in models:
    model = models_lib.create_model(num_classes=num_classes, **kw)
    v = models_lib.abstract_variables(model, height, width)
    total = models_lib.count_params(v['params'])
    cls = sum(
        models_lib.count_params(v['params'][k]) for k in v['params'] if k.endswith('classifier')
    )
    fmap_h = -(-height // 16)
    fmap_w = -(-width // 16)
    gflops = flops_per_image(model, height, width) / 1e9
    xla = flops_per_image(model, height, width, method='xla') / 1e9
    lines.append(
        f'{name:<18}{(total - cls) / 1e6:>12.2f}{total / 1e6:>13.2f}'
        f'{models_lib.embedding_dim(model):>9}{f"{fmap_h}x{fmap_w}":>8}{gflops:>12.2f}{xla:>9.2f}'
    )
  return '\n'.join(lines)
