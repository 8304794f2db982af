"""OSNet (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification", ICCV 2019),
laid out exactly as torchreid's `osnet_x1_0` .. `osnet_x0_25` so that torchreid checkpoints
convert tensor for tensor and jaxreid models export back (docs/reference.md section 8).

Flax module names are torchreid's with `_` for the `.` before an index (`conv2_0/conv2b_1/conv1`
is `conv2.0.conv2b.1.conv1`); `torch_name` maps one to the other. The trunk is cut into stages so
that ABMT can share the first ones and duplicate the last (`models.ABMTNet`):

  stage 0: conv1 (7x7/2 conv + BN + ReLU) + 3x3/2 max pool
  stage 1: conv2 = 2 OSBlocks + transition (1x1 conv + 2x2 average pool)
  stage 2: conv3 = 2 OSBlocks + transition
  stage 3: conv4 = 2 OSBlocks, conv5 (1x1 conv + BN + ReLU)   (ABMT's branch stage)

A 256x128 input gives a 16x8 map. The embedding head (`OSNetEmbedding`) is torchreid's `fc`
(Linear(C, 512) + BatchNorm1d + ReLU) and, with the default head 'bnneck', a bias-free BN neck
behind it: triplet losses read the 512-d fc embedding (the feature torchreid's own triplet loss
reads), the classifier and evaluation the neck's output, as MMT's ResNet head does. The head
'fc_pre_bn' has no neck: triplet losses read the Linear output before the fc's BatchNorm, the
classifier and evaluation the fc embedding (docs/reference.md section 8a says why the default
differs).
"""

from __future__ import annotations

import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid.layers import EXTRA_BLOCK_INIT
from jaxreid.layers import ConvBN
from jaxreid.layers import DepthwiseConv
from jaxreid.layers import Dtype
from jaxreid.layers import batch_norm
from jaxreid.layers import conv2d
from jaxreid.layers import conv_init_fan_out

Array = jax.Array

# torchreid's channel widths per variant (conv1, conv2, conv3, conv4 = conv5).
CHANNELS = {
    'osnet_x1_0': (64, 256, 384, 512),
    'osnet_x0_75': (48, 192, 288, 384),
    'osnet_x0_5': (32, 128, 192, 256),
    'osnet_x0_25': (16, 64, 96, 128),
}
FEATURE_DIM = 512  # torchreid's fc width for every variant
BRANCH_STAGE = 3  # ABMT duplicates stage 3 (conv4 + conv5) per branch
linear_init = nn.initializers.normal(stddev=0.01)  # torchreid `_init_params` for nn.Linear


def torch_name(flax_name: str) -> str:
  """'conv2_0' -> 'conv2.0', 'conv2b_1' -> 'conv2b.1', 'fc_0' -> 'fc.0'."""
  return re.sub(r'_(\d+)', r'.\1', flax_name)


class _LightConv3x3(nn.Module):
  """1x1 conv (linear) -> depthwise 3x3 -> BN -> ReLU (torchreid LightConv3x3)."""

  features: int
  dtype: Dtype = jnp.float32
  norm_group_size: int = 0
  kernel_init: object = conv_init_fan_out
  bn_scale_init: object = nn.initializers.ones

  @nn.compact
  def __call__(self, x, train=False):
    x = conv2d(self.features, 1, 1, 0, self.dtype, self.kernel_init, 'conv1')(x)
    x = DepthwiseConv(3, 1, 1, self.dtype, self.kernel_init, name='conv2')(x)
    x = batch_norm('bn', train, self.dtype, self.norm_group_size, self.bn_scale_init)(x)
    return nn.relu(x)


class _ChannelGate(nn.Module):
  """Global average pool -> 1x1 conv (C -> C/16, bias) -> ReLU -> 1x1 conv (bias) -> sigmoid;
  the input times the gates."""

  dtype: Dtype = jnp.float32
  kernel_init: object = conv_init_fan_out

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    g = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
    g = nn.relu(conv2d(c // 16, 1, 1, 0, self.dtype, self.kernel_init, 'fc1', use_bias=True)(g))
    g = conv2d(c, 1, 1, 0, self.dtype, self.kernel_init, 'fc2', use_bias=True)(g)
    return x * nn.sigmoid(g)


class OSBlock(nn.Module):
  """Omni-scale residual block: four streams of 1, 2, 3, 4 lightweight 3x3 convs over a 1x1
  reduction (out/4 channels), fused by one shared channel gate, 1x1 expansion, residual."""

  features: int
  dtype: Dtype = jnp.float32
  norm_group_size: int = 0
  kernel_init: object = conv_init_fan_out
  bn_scale_init: object = nn.initializers.ones

  @nn.compact
  def __call__(self, x, train=False):
    mid = self.features // 4
    kw = dict(
        dtype=self.dtype,
        norm_group_size=self.norm_group_size,
        kernel_init=self.kernel_init,
        bn_scale_init=self.bn_scale_init,
    )
    x1 = ConvBN(mid, **kw, name='conv1')(x, train)
    gate = _ChannelGate(self.dtype, self.kernel_init, name='gate')
    x2 = None
    for stream, depth in (('conv2a', 1), ('conv2b', 2), ('conv2c', 3), ('conv2d', 4)):
      y = x1
      for i in range(depth):
        name = stream if stream == 'conv2a' else f'{stream}_{i}'
        y = _LightConv3x3(mid, **kw, name=name)(y, train)
      y = gate(y)
      x2 = y if x2 is None else x2 + y
    x3 = ConvBN(self.features, act='none', **kw, name='conv3')(x2, train)
    identity = x
    if x.shape[-1] != self.features:
      identity = ConvBN(self.features, act='none', **kw, name='downsample')(x, train)
    return nn.relu(x3 + identity)


class OSNetTrunk(nn.Module):
  """Stages `stages` of OSNet (see the module docstring), plus optionally ABMT's extra OSBlock
  (C -> C, identity shortcut; convs Kaiming-normal fan_in, BN scales N(1, 0.02)) at the end."""

  variant: str = 'osnet_x1_0'
  dtype: Dtype = jnp.float32
  norm_group_size: int = 0
  stages: Sequence[int] = (0, 1, 2, 3)
  extra_block: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    c = CHANNELS[self.variant]
    kw = dict(dtype=self.dtype, norm_group_size=self.norm_group_size)
    x = x.astype(self.dtype)
    if 0 in self.stages:
      x = ConvBN(c[0], 7, 2, 3, **kw, name='conv1')(x, train)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s in (1, 2, 3):
      if s not in self.stages:
        continue
      for i in range(2):
        x = OSBlock(c[s], **kw, name=f'conv{s + 1}_{i}')(x, train)
      if s < 3:  # transition: Conv1x1 + AvgPool2d(2, 2)
        x = ConvBN(c[s], **kw, name=f'conv{s + 1}_2_0')(x, train)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      else:
        x = ConvBN(c[3], **kw, name='conv5')(x, train)
    if self.extra_block:
      x = OSBlock(x.shape[-1], **kw, **EXTRA_BLOCK_INIT, name='extra')(x, train)
    return x


class OSNetEmbedding(nn.Module):
  """torchreid's `fc`: Linear(C, 512) (`fc_0`) -> BatchNorm1d (`fc_1`, with bias) -> ReLU, then
  with `bn_neck` a bias-free BatchNorm1d (`bn`, the BN neck).

  Returns the re-ID head's (triplet feature, neck output) pair, float32: (fc embedding, BN neck
  of it) with `bn_neck`, else (the Linear output before the fc's BN, the fc embedding)."""

  norm_group_size: int = 0
  bn_neck: bool = True

  @nn.compact
  def __call__(self, f: Array, train: bool = False):
    z = nn.Dense(
        FEATURE_DIM,
        kernel_init=linear_init,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name='fc_0',
    )(f.astype(jnp.float32))
    v = nn.relu(batch_norm('fc_1', train, jnp.float32, self.norm_group_size)(z))
    if not self.bn_neck:
      return z, v
    return v, batch_norm('bn', train, jnp.float32, self.norm_group_size, use_bias=False)(v)
