"""MobileNetV2 (Sandler et al., CVPR 2018) in torchvision's layout (width 1.0), so that
torchvision's ImageNet `features` convert tensor for tensor and jaxreid models export back
(docs/reference.md section 8).

Flax modules are named `features_<i>` after torchvision's `features[i]`: `features_0` (3x3/2 conv
+ BN + ReLU6), `features_1` .. `features_17` inverted residual blocks with children `expand`
(1x1 + BN + ReLU6, absent when t = 1), `dw` (depthwise 3x3 + BN + ReLU6) and `project`
(1x1 + BN), and `features_18` (1x1 conv to 1280 + BN + ReLU6). `torch_key` maps them to
torchvision's current state-dict names or to the older flat layout some releases use.

Stages (ABMT shares 0-3 and duplicates 4 per branch):
  0: features 0-1 (stride 2)   1: 2-3 (24 ch, /4)   2: 4-6 (32 ch, /8)
  3: 7-13 (64, 96 ch, /16)     4: 14-18 (160, 320, 1280 ch, /32; /16 with last_stride 1)
The re-ID head is ResNet's: global average pool -> 1280-d feature -> BN neck -> classifier.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid.layers import EXTRA_BLOCK_INIT
from jaxreid.layers import ConvBN
from jaxreid.layers import Dtype
from jaxreid.layers import conv_init_fan_out

Array = jax.Array

# (expansion t, output channels c, blocks n, first stride s), torchvision's inverted_residual_setting
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
FEATURE_DIM = 1280
BRANCH_STAGE = 4
STAGE_OF_BLOCK = (0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4)  # features[i] -> stage
LAST_STRIDE_BLOCK = 14  # the first 160-channel block: its stride is `last_stride`


def block_specs(last_stride: int = 2):
  """[(index, in_ch, out_ch, t, stride)] for features[1..17]."""
  specs, cin, i = [], 32, 1
  for t, c, n, s in SETTINGS:
    for k in range(n):
      stride = s if k == 0 else 1
      if i == LAST_STRIDE_BLOCK:
        stride = last_stride
      specs.append((i, cin, c, t, stride))
      cin, i = c, i + 1
  return specs


class InvertedResidual(nn.Module):
  """torchvision InvertedResidual: [1x1 expand] -> depthwise 3x3 (stride) -> 1x1 project;
  identity shortcut when stride 1 and in == out."""

  features: int
  expansion: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  norm_group_size: int = 0
  kernel_init: object = conv_init_fan_out
  bn_scale_init: object = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    kw = dict(
        dtype=self.dtype,
        norm_group_size=self.norm_group_size,
        kernel_init=self.kernel_init,
        bn_scale_init=self.bn_scale_init,
    )
    hidden = x.shape[-1] * self.expansion
    y = x
    if self.expansion != 1:
      y = ConvBN(hidden, act='relu6', **kw, name='expand')(y, train)
    y = ConvBN(hidden, 3, self.stride, 1, act='relu6', depthwise=True, **kw, name='dw')(y, train)
    y = ConvBN(self.features, act='none', **kw, name='project')(y, train)
    if self.stride == 1 and x.shape[-1] == self.features:
      y = x + y
    return y


class MobileNetV2Trunk(nn.Module):
  """Stages `stages` of MobileNetV2 `features`; `extra_block` inserts ABMT's extra block (an
  inverted residual 320 -> 320, t = 6, identity shortcut; convs Kaiming-normal fan_in, BN scales
  N(1, 0.02)) before the final 1x1 conv."""

  last_stride: int = 2
  dtype: Dtype = jnp.float32
  norm_group_size: int = 0
  stages: Sequence[int] = (0, 1, 2, 3, 4)
  extra_block: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, norm_group_size=self.norm_group_size)
    x = x.astype(self.dtype)
    if 0 in self.stages:
      x = ConvBN(32, 3, 2, 1, act='relu6', **kw, name='features_0')(x, train)
    for i, _cin, cout, t, stride in block_specs(self.last_stride):
      if STAGE_OF_BLOCK[i] in self.stages:
        x = InvertedResidual(cout, t, stride, **kw, name=f'features_{i}')(x, train)
    if 4 in self.stages:
      if self.extra_block:
        x = InvertedResidual(x.shape[-1], 6, 1, **kw, **EXTRA_BLOCK_INIT, name='extra')(x, train)
      x = ConvBN(FEATURE_DIM, act='relu6', **kw, name='features_18')(x, train)
    return x


# torchvision names of a block's children: modern (Conv2dNormActivation nesting) and the older
# flat Sequential; (expansion == 1, expansion != 1) variants.
_MODERN = (
    {'dw/conv': '0.0', 'dw/bn': '0.1', 'project/conv': '1', 'project/bn': '2'},
    {
        'expand/conv': '0.0',
        'expand/bn': '0.1',
        'dw/conv': '1.0',
        'dw/bn': '1.1',
        'project/conv': '2',
        'project/bn': '3',
    },
)
_FLAT = (
    {'dw/conv': '0', 'dw/bn': '1', 'project/conv': '3', 'project/bn': '4'},
    {
        'expand/conv': '0',
        'expand/bn': '1',
        'dw/conv': '3',
        'dw/bn': '4',
        'project/conv': '6',
        'project/bn': '7',
    },
)
LAYOUTS = {'modern': _MODERN, 'flat': _FLAT}


def torch_module(path: Sequence[str], layout: str = 'modern') -> str | None:
  """torchvision module name (without the leaf) of a trunk path such as
  ('features_3', 'dw', 'bn'); None for modules torchvision does not have (`extra`)."""
  top = path[0]
  if not top.startswith('features_'):
    return None
  i = int(top.split('_')[1])
  if i in (0, 18):
    return f'features.{i}.{ {"conv": 0, "bn": 1}[path[1]] }'
  expansion = 1 if i == 1 else 6
  table = LAYOUTS[layout][expansion != 1]
  return f'features.{i}.conv.{table["/".join(path[1:3])]}'
