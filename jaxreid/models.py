"""ResNet / IBN-ResNet-a backbones, the re-ID head and ABMT's asymmetric two-branch network.

Everything follows docs/reference.md section 1 (the reference PyTorch models of MMT and ABMT):

* torchvision layout (ResNet v1.5: the stride of a bottleneck sits on its 3x3 conv), NHWC;
  PyTorch's symmetric explicit padding (Flax 'SAME' pads asymmetrically for stride 2, which would
  break weight-for-weight parity with converted checkpoints, see `jaxreid.convert`);
* last stride 1 (a 256x128 input gives a 16x8 map), stem without ReLU for the plain ResNet (the
  reference builds `nn.Sequential(conv1, bn1, maxpool, layer1..)`), with ReLU for IBN-a;
* BatchNorm with PyTorch's eps/momentum and *unbiased* running variance, statistics in float32
  whatever the compute dtype;
* BN neck without bias, bias-free classifier initialised N(0, 0.001), eval output = L2-normalised
  post-neck feature.

Parameter tree (the `'params'` collection; `'batch_stats'` mirrors every BatchNorm with
`mean`/`var`)::

  ReIDNet:  backbone/{conv1, bn1, layer1_0 .. layer4_2}, neck/{scale}, classifier/{kernel}
  ABMTNet:  backbone/{conv1, bn1, layer1_* .. layer3_*}          (shared trunk)
            avg_branch/{layer4_0 .. layer4_2}                     (layer4 for the avg branch)
            max_branch/{layer4_0 .. layer4_2, extra}              (layer4 copy + extra block)
            avg_neck/{scale}, max_neck/{scale}, avg_classifier/{kernel}, max_classifier/{kernel}
  block:    conv1, bn1 (IBN: bn1/IN/{scale,bias} + bn1/BN/{scale,bias}), conv2, bn2[, conv3, bn3]
            [, downsample_conv, downsample_bn]
  conv: {kernel (kh, kw, in, out)}; BN: {scale, bias} (+ batch_stats {mean, var});
  Dense: {kernel (in, out)}

Classifier *rows* in PyTorch terms are the *columns* of the Flax kernel: row k == kernel[:, k].
"""

from __future__ import annotations

import math
from typing import Any
from typing import Callable
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid import mobilenetv2
from jaxreid import osnet
from jaxreid.layers import EXTRA_BLOCK_INIT
from jaxreid.layers import Dtype
from jaxreid.layers import InstanceNorm
from jaxreid.layers import batch_norm
from jaxreid.layers import classifier_init
from jaxreid.layers import conv2d
from jaxreid.layers import conv_init_fan_out
from jaxreid.layers import l2_normalize
from jaxreid.layers import to_dtype as _to_dtype

Array = jax.Array

# depth -> (block type, blocks per stage)
RESNET_SPECS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
_EXPANSION = {'basic': 1, 'bottleneck': 4}
POOLINGS = ('avg', 'max', 'gem')
# Which tensor each loss reads (docs/reference.md section 1): 'bnneck' (every backbone) gives the
# triplet losses the pooled feature (OSNet: its fc embedding) and the classifier and evaluation a
# BN neck behind it; 'fc_pre_bn' (OSNet only) gives the triplet losses the fc's Linear output
# before its BatchNorm and the classifier and evaluation the fc embedding.
HEADS = ('bnneck', 'fc_pre_bn')
GEM_P = 3.0  # fixed (not learned) GeM exponent; no reference run uses GeM


class IBN(nn.Module):
  """IBN-a: first `planes // 2` channels InstanceNorm (`IN`), the rest BatchNorm (`BN`)."""

  planes: int
  use_running_average: bool = False
  dtype: Dtype = jnp.float32
  group_size: int = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    half = self.planes // 2
    a = InstanceNorm(dtype=self.dtype, name='IN')(x[..., :half])
    b = batch_norm('BN', not self.use_running_average, self.dtype, self.group_size)(x[..., half:])
    return jnp.concatenate([a, b], axis=-1)


# ----------------------------------------------------------------------------------------------
# Residual blocks


class ResidualBlock(nn.Module):
  """torchvision BasicBlock / Bottleneck (v1.5: stride on the 3x3 conv), optional IBN-a bn1."""

  planes: int
  block: str = 'bottleneck'
  stride: int = 1
  ibn: bool = False
  dtype: Dtype = jnp.float32
  norm_group_size: int = 0
  kernel_init: Callable = conv_init_fan_out
  bn_scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    exp = _EXPANSION[self.block]
    out_ch = self.planes * exp

    def bn(name):
      return batch_norm(name, train, self.dtype, self.norm_group_size, self.bn_scale_init)

    def conv(features, kernel, stride, pad, name):
      return conv2d(
          features, kernel, stride, pad, self.dtype, self.kernel_init, name, pointwise_as_dot=True
      )

    if self.ibn:
      norm1 = IBN(
          self.planes,
          use_running_average=not train,
          dtype=self.dtype,
          group_size=self.norm_group_size,
          name='bn1',
      )
    else:
      norm1 = bn('bn1')

    if self.block == 'bottleneck':
      y = nn.relu(norm1(conv(self.planes, 1, 1, 0, 'conv1')(x)))
      y = nn.relu(bn('bn2')(conv(self.planes, 3, self.stride, 1, 'conv2')(y)))
      y = bn('bn3')(conv(out_ch, 1, 1, 0, 'conv3')(y))
    else:
      y = nn.relu(norm1(conv(self.planes, 3, self.stride, 1, 'conv1')(x)))
      y = bn('bn2')(conv(self.planes, 3, 1, 1, 'conv2')(y))

    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_ch:
      shortcut = bn('downsample_bn')(conv(out_ch, 1, self.stride, 0, 'downsample_conv')(x))
    return nn.relu(y + shortcut)


class ResNetTrunk(nn.Module):
  """A contiguous piece of a ResNet: any of stem (0) and layer1..4 (1..4), plus optionally
  ABMT's extra identity-shortcut bottleneck (C -> C/4 -> C/4 -> C) at the end."""

  depth: int = 50
  width: int = 64
  ibn: bool = False
  stem_relu: bool = False
  last_stride: int = 1
  dtype: Dtype = jnp.float32
  norm_group_size: int = 0
  stages: Sequence[int] = (0, 1, 2, 3, 4)
  extra_bottleneck: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.depth not in RESNET_SPECS:
      raise ValueError(f'unsupported ResNet depth {self.depth}; choose from {sorted(RESNET_SPECS)}')
    block, counts = RESNET_SPECS[self.depth]
    x = x.astype(self.dtype)
    if 0 in self.stages:
      x = conv2d(self.width, 7, 2, 3, self.dtype, conv_init_fan_out, 'conv1')(x)
      x = batch_norm('bn1', train, self.dtype, self.norm_group_size)(x)
      if self.stem_relu:
        x = nn.relu(x)
      # -inf padding (Flax pools pad with the reduction's init value), as nn.MaxPool2d(3, 2, 1).
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s in self.stages:
      if s == 0:
        continue
      planes = self.width * 2 ** (s - 1)
      stride = {1: 1, 2: 2, 3: 2, 4: self.last_stride}[s]
      for i in range(counts[s - 1]):
        x = ResidualBlock(
            planes,
            block,
            stride if i == 0 else 1,
            ibn=self.ibn and s < 4,
            dtype=self.dtype,
            norm_group_size=self.norm_group_size,
            name=f'layer{s}_{i}',
        )(x, train)
    if self.extra_bottleneck:
      x = _extra_block(x.shape[-1], self.dtype, self.norm_group_size, 'extra')(x, train)
    return x


def _extra_block(channels, dtype, norm_group_size, name=None):
  """ABMT's extra bottleneck (torchvision `Bottleneck(2048, 512)` at width 64): identity shortcut,
  convs Kaiming-normal fan_in, BN scales ~ N(1, 0.02), biases 0 (docs/reference.md section 1)."""
  return ResidualBlock(
      channels // 4,
      'bottleneck',
      1,
      dtype=dtype,
      norm_group_size=norm_group_size,
      **EXTRA_BLOCK_INIT,
      name=name,
  )


def global_pool(x: Array, pooling: str) -> Array:
  """(B, H, W, C) -> (B, C) float32."""
  x = x.astype(jnp.float32)
  if pooling == 'avg':
    return jnp.mean(x, axis=(1, 2))
  if pooling == 'max':
    return jnp.max(x, axis=(1, 2))
  if pooling == 'gem':
    return jnp.mean(jnp.maximum(x, 1e-6) ** GEM_P, axis=(1, 2)) ** (1.0 / GEM_P)
  raise ValueError(f'pooling must be one of {POOLINGS}, got {pooling!r}')


def _neck(name, train, group_size):
  return batch_norm(name, train, jnp.float32, group_size, use_bias=False)


def _classifier(name, num_classes):
  return nn.Dense(
      num_classes,
      use_bias=False,
      kernel_init=classifier_init,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      name=name,
  )


BACKBONES = ('resnet', 'mobilenetv2') + tuple(osnet.CHANNELS)


def _check_fields(m):
  if m.backbone not in BACKBONES:
    raise ValueError(f'unknown backbone {m.backbone!r}; choose from {BACKBONES}')
  if m.backbone == 'resnet' and m.depth not in RESNET_SPECS:
    raise ValueError(f'unsupported ResNet depth {m.depth}; choose from {sorted(RESNET_SPECS)}')
  if m.pooling not in POOLINGS:
    raise ValueError(f'pooling must be one of {POOLINGS}, got {m.pooling!r}')
  if m.head not in HEADS:
    raise ValueError(f'head must be one of {HEADS}, got {m.head!r}')
  if m.head == 'fc_pre_bn' and not m.backbone.startswith('osnet'):
    raise ValueError(f"head 'fc_pre_bn' is OSNet's (its fc block); {m.backbone} has 'bnneck' only")
  if m.num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {m.num_classes}')


class _ReIDFields(nn.Module):
  """The fields every re-ID network shares (design.md); subclasses add `__call__`.

  `backbone`: 'resnet' (`depth`, `width`, `ibn`, `stem_relu` apply), 'osnet_x1_0' ..
  'osnet_x0_25' (torchreid's OSNet), 'mobilenetv2' (torchvision's, width 1.0). `last_stride`
  applies to ResNet's layer4 and MobileNetV2's features[14] (OSNet has no stride there)."""

  backbone: str = 'resnet'
  depth: int = 50
  width: int = 64
  ibn: bool = False
  stem_relu: bool | None = None  # None -> False for plain ResNet (MMT), True for IBN-a
  last_stride: int = 1
  pooling: str = 'avg'
  head: str = 'bnneck'
  num_classes: int = 1024
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  norm_group_size: int = 0

  def trunk(self, name: str, stages: Sequence[int] | None = None, extra: bool = False):
    """The backbone module for `stages` (None: all), optionally with ABMT's extra block."""
    dtype = _to_dtype(self.dtype)
    if stages is None:  # every stage, up to the one ABMT duplicates
      stages = tuple(range(branch_stage(self.backbone) + 1))
    if self.backbone == 'resnet':
      return ResNetTrunk(
          self.depth,
          self.width,
          self.ibn,
          self.ibn if self.stem_relu is None else self.stem_relu,
          self.last_stride,
          dtype,
          self.norm_group_size,
          stages=stages,
          extra_bottleneck=extra,
          name=name,
      )
    if self.backbone == 'mobilenetv2':
      return mobilenetv2.MobileNetV2Trunk(
          self.last_stride,
          dtype,
          self.norm_group_size,
          stages=stages,
          extra_block=extra,
          name=name,
      )
    return osnet.OSNetTrunk(
        self.backbone,
        dtype,
        self.norm_group_size,
        stages=stages,
        extra_block=extra,
        name=name,
    )

  def reid_head(self, name: str, f: Array, train: bool):
    """Pooled feature -> (features for triplet losses, neck output for the classifier and
    evaluation), as `head` says (HEADS). ResNet / MobileNetV2: f and BN(f) (bias-free BN neck);
    OSNet: torchreid's fc embedding and a BN neck of it, or ('fc_pre_bn') the fc's Linear output
    and the fc embedding (`osnet.OSNetEmbedding`)."""
    if self.backbone.startswith('osnet'):
      bn_neck = self.head == 'bnneck'
      return osnet.OSNetEmbedding(self.norm_group_size, bn_neck, name=name)(f, train)
    return f, _neck(name, train, self.norm_group_size)(f)


def branch_stage(backbone: str) -> int:
  """The last stage, which ABMT duplicates per branch (ResNet: layer4)."""
  if backbone.startswith('osnet'):
    return osnet.BRANCH_STAGE
  return mobilenetv2.BRANCH_STAGE if backbone == 'mobilenetv2' else 4


class ReIDNet(_ReIDFields):
  """Backbone + re-ID head (docs/reference.md section 1).

  train=True  -> {'features': f (B, D) pre-neck float32, 'logits': z (B, num_classes) float32}
                 (apply with `mutable=['batch_stats']`, rng 'dropout' if dropout > 0)
  train=False -> (B, D) float32 L2-normalised neck output.
  `num_classes` is a fixed maximum width; inactive rows are masked by the losses (`class_mask`).
  `pooled_offset` (1, B, pooled_dim), if given, is added to the pooled trunk feature, which the
  train output then also holds ('pooled'): at zero it changes nothing, and a loss's gradient
  with respect to it is the gradient with respect to that feature
  (`jaxreid.train.make_gradient_shares`).
  """

  @nn.compact
  def __call__(self, x: Array, train: bool = False, pooled_offset: Array | None = None):
    _check_fields(self)
    fmap = self.trunk('backbone')(x, train)
    pooled = global_pool(fmap, self.pooling)
    if pooled_offset is not None:
      pooled = pooled + pooled_offset[0]
    f, bn_f = self.reid_head('neck', pooled, train)
    if not train and not self.is_initializing():
      return l2_normalize(bn_f)
    h = nn.Dropout(self.dropout, deterministic=not train)(bn_f) if self.dropout > 0 else bn_f
    z = _classifier('classifier', self.num_classes)(h)
    if not train:  # initialisation in eval mode: the classifier params exist, output is eval's
      return l2_normalize(bn_f)
    if pooled_offset is not None:
      return {'features': f, 'logits': z, 'pooled': pooled}
    return {'features': f, 'logits': z}


class ABMTNet(_ReIDFields):
  """ABMT asymmetric-branch network (docs/reference.md section 1); same fields as ReIDNet.

  Shared trunk = every stage but the last (`backbone`); branch avg = `avg_branch` (the last
  stage) -> average pooling -> `avg_neck` -> `avg_classifier`; branch max = `max_branch` (a
  separate copy of the last stage + the `extra` block) -> max pooling -> `max_neck` ->
  `max_classifier`. `pooling` is ignored (fixed avg / max per branch).
  train=True  -> {'avg/features', 'avg/logits', 'max/features', 'max/logits'} (float32)
  train=False -> (B, 2D) concat of the neck outputs [avg, max], jointly L2-normalised.
  `pooled_offset` (2, B, pooled_dim): as ReIDNet's, [0] for the avg branch, [1] for the max
  ('avg/pooled', 'max/pooled').
  """

  @nn.compact
  def __call__(self, x: Array, train: bool = False, pooled_offset: Array | None = None):
    _check_fields(self)
    last = branch_stage(self.backbone)
    t = self.trunk('backbone', stages=tuple(range(last)))(x, train)
    pa = global_pool(self.trunk('avg_branch', (last,))(t, train), 'avg')
    pm = global_pool(self.trunk('max_branch', (last,), extra=True)(t, train), 'max')
    if pooled_offset is not None:
      pa, pm = pa + pooled_offset[0], pm + pooled_offset[1]
    fa, bn_a = self.reid_head('avg_neck', pa, train)
    fm, bn_m = self.reid_head('max_neck', pm, train)
    if not train and not self.is_initializing():
      return l2_normalize(jnp.concatenate([bn_a, bn_m], axis=-1))
    if self.dropout > 0:
      ha = nn.Dropout(self.dropout, deterministic=not train)(bn_a)
      hm = nn.Dropout(self.dropout, deterministic=not train)(bn_m)
    else:
      ha, hm = bn_a, bn_m
    za = _classifier('avg_classifier', self.num_classes)(ha)
    zm = _classifier('max_classifier', self.num_classes)(hm)
    if not train:
      return l2_normalize(jnp.concatenate([bn_a, bn_m], axis=-1))
    out = {'avg/features': fa, 'avg/logits': za, 'max/features': fm, 'max/logits': zm}
    if pooled_offset is not None:
      out.update({'avg/pooled': pa, 'max/pooled': pm})
    return out


# ----------------------------------------------------------------------------------------------
# Helpers


MODEL_FIELDS = (
    'backbone',
    'depth',
    'width',
    'ibn',
    'stem_relu',
    'last_stride',
    'pooling',
    'head',
    'num_classes',
    'dropout',
    'dtype',
    'norm_group_size',
)
# Keys a model config may carry that are not model fields (used by other modules).
_NON_MODEL_KEYS = ('arch', 'pretrained', 'pretrained_path', 'weights', 'init_checkpoint')


def create_model(config=None, **kwargs) -> nn.Module:
  """ReIDNet or ABMTNet from a ConfigDict / dict (e.g. `config.model`) and/or keyword arguments.

  `arch`: 'resnet' (default) | 'abmt'; the other keys are the model fields (MODEL_FIELDS);
  `dtype` may be a string ('float32' | 'bfloat16'). Keys `pretrained`, `pretrained_path`,
  `weights`, `init_checkpoint` are ignored (weights are loaded elsewhere); any other unknown key is
  an error (catches config typos).
  """
  cfg = {}
  if config is not None:
    cfg.update(config.to_dict() if hasattr(config, 'to_dict') else dict(config))
  cfg.update(kwargs)
  arch = cfg.pop('arch', 'resnet')
  unknown = sorted(k for k in cfg if k not in MODEL_FIELDS and k not in _NON_MODEL_KEYS)
  if unknown:
    raise ValueError(f'create_model: unknown model keys {unknown}; expected {MODEL_FIELDS}')
  fields = {k: v for k, v in cfg.items() if k in MODEL_FIELDS}
  if 'dtype' in fields:
    fields['dtype'] = _to_dtype(fields['dtype'])
  if arch == 'resnet':
    return ReIDNet(**fields)
  if arch == 'abmt':
    return ABMTNet(**fields)
  raise ValueError(f"create_model: arch must be 'resnet' or 'abmt', got {arch!r}")


def feature_dim(model) -> int:
  """Dimension D of one branch's eval feature: ResNet 8 * width * expansion (2048 for
  ResNet-50), OSNet 512 (its fc), MobileNetV2 1280."""
  if model.backbone.startswith('osnet'):
    return osnet.FEATURE_DIM
  if model.backbone == 'mobilenetv2':
    return mobilenetv2.FEATURE_DIM
  block, _ = RESNET_SPECS[model.depth]
  return 8 * model.width * _EXPANSION[block]


def pooled_dim(model) -> int:
  """Channels of the pooled trunk feature, the input of the head (OSNet x0.25: 128)."""
  if model.backbone.startswith('osnet'):
    return osnet.CHANNELS[model.backbone][3]
  if model.backbone == 'mobilenetv2':
    return mobilenetv2.FEATURE_DIM
  return feature_dim(model)


def num_heads(model) -> int:
  """Re-ID heads (pooled features) per network: 2 for ABMTNet's branches, else 1."""
  return 2 if isinstance(model, ABMTNet) else 1


def embedding_dim(model) -> int:
  """Dimension of the eval output: D for ReIDNet, 2D for ABMTNet (= centroid dimension)."""
  d = feature_dim(model)
  return 2 * d if isinstance(model, ABMTNet) else d


def class_mask(num_active, num_classes: int) -> Array:
  """bool (num_classes,): True for the first `num_active` classifier rows (traceable)."""
  return jnp.arange(num_classes) < num_active


def _set_rows(kernel: Array, rows: Array) -> Array:
  k = rows.shape[0]
  if k > kernel.shape[1]:
    raise ValueError(
        f'{k} centroids but the classifier has only {kernel.shape[1]} rows ' '(raise num_classes)'
    )
  if rows.shape[1] != kernel.shape[0]:
    raise ValueError(f'centroid dim {rows.shape[1]} != classifier input dim {kernel.shape[0]}')
  new = jnp.zeros_like(kernel)
  return new.at[:, :k].set(l2_normalize(rows.astype(jnp.float32)).T.astype(kernel.dtype))


def set_classifier_rows(params, centroids) -> Any:
  """Classifier rows 0..K-1 := L2-normalised centroids (K, D_eval), the other rows 0.

  docs/reference.md section 3, step 3 (MMT) and ABMT's dynamic classifiers: for ABMTNet the centroid's
  first half (avg-branch feature) is normalised into `avg_classifier`, the second half into
  `max_classifier`. Accepts the `'params'` collection or a full variables dict containing it and
  returns the same structure (new dicts, inputs untouched); works under jit.
  """
  if 'params' in params and not any(k in params for k in ('classifier', 'avg_classifier')):
    return {**params, 'params': set_classifier_rows(params['params'], centroids)}
  centroids = jnp.asarray(centroids)
  out = dict(params)
  if 'classifier' in params:
    out['classifier'] = {
        **params['classifier'],
        'kernel': _set_rows(params['classifier']['kernel'], centroids),
    }
  elif 'avg_classifier' in params and 'max_classifier' in params:
    d = params['avg_classifier']['kernel'].shape[0]
    if centroids.shape[1] != 2 * d:
      raise ValueError(f'ABMT centroids must have 2D = {2 * d} columns, got {centroids.shape[1]}')
    for name, part in (('avg_classifier', centroids[:, :d]), ('max_classifier', centroids[:, d:])):
      out[name] = {**params[name], 'kernel': _set_rows(params[name]['kernel'], part)}
  else:
    raise ValueError('set_classifier_rows: no classifier / avg_classifier in params')
  return out


def count_params(params) -> int:
  """Number of scalars in a pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def abstract_variables(model, height: int = 256, width: int = 128, batch: int = 1):
  """Variable shapes without computing anything (`jax.eval_shape` of init)."""
  x = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
  return jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)
