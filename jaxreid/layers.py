"""Layers shared by every backbone: PyTorch-equivalent normalisation, convolutions with PyTorch's
symmetric padding, 1x1 and depthwise convolutions that are fast on every backend, and
initialisers.

Parity with the PyTorch reference networks (docs/reference.md section 8) needs PyTorch's
BatchNorm (unbiased running variance, eps 1e-5, momentum 0.1) and its explicit symmetric padding
(Flax 'SAME' pads asymmetrically for stride 2).
"""

from __future__ import annotations

import functools
import math
from typing import Any
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# torchvision's ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
conv_init_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# ABMT's extra bottleneck (`weights_init_kaiming`): kaiming_normal_(a=0, mode='fan_in').
conv_init_fan_in = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
classifier_init = nn.initializers.normal(stddev=0.001)


def bn_scale_init_abmt(key, shape, dtype=jnp.float32):
  """ABMT's extra bottleneck: BN weights ~ N(1, 0.02) (`weights_init_kaiming`)."""
  return (1.0 + 0.02 * jax.random.normal(key, shape)).astype(dtype)


# Initialisers of ABMT's extra block, whatever the backbone (docs/reference.md sections 1, 8).
EXTRA_BLOCK_INIT = {'kernel_init': conv_init_fan_in, 'bn_scale_init': bn_scale_init_abmt}


def to_dtype(dtype) -> Dtype:
  if isinstance(dtype, str):
    return {
        'float32': jnp.float32,
        'bfloat16': jnp.bfloat16,
        'float16': jnp.float16,
        'fp32': jnp.float32,
        'bf16': jnp.bfloat16,
    }[dtype]
  return dtype


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """`torch.nn.functional.normalize`: x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


# ----------------------------------------------------------------------------------------------
# Normalisation layers


class BatchNorm(nn.Module):
  """PyTorch-equivalent BatchNorm over all axes but the last (works for NHWC and (B, D)).

  Differences from `flax.linen.BatchNorm`, all needed for parity with the reference:
  * the running variance is updated with the *unbiased* batch variance (n / (n - 1)), as PyTorch;
  * statistics are computed in float32 (two-pass variance) whatever the compute dtype;
  * `group_size` G > 0 normalises consecutive groups of G images with their own statistics.
    This reproduces the reference's 4-GPU `nn.DataParallel`, where every BN replica saw a
    16-image chunk of the 64-image batch. The running statistics are then updated with the mean
    over groups of the group statistics (the reference kept only GPU 0's replica, i.e. the first
    chunk's; averaging is the less noisy choice and equal in expectation).
    G = 0 uses the whole batch: under `jit` over a device mesh that is the *global* batch, so the
    result does not depend on the number of devices.

  Variables: params `scale` (and `bias` unless `use_bias=False`), batch_stats `mean`, `var`.
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones
  group_size: int = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32) if self.use_bias else None
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    x32 = x.astype(jnp.float32)

    if self.use_running_average:
      y = (x32 - ra_mean.value) * (scale * jax.lax.rsqrt(ra_var.value + self.epsilon))
      if bias is not None:
        y = y + bias
      return y.astype(self.dtype)

    b = x.shape[0]
    g = self.group_size
    if g and g < b:
      if b % g:
        raise ValueError(f'BatchNorm: batch size {b} is not a multiple of norm_group_size {g}')
      xg = x32.reshape((b // g, g) + x.shape[1:])
    else:
      xg = x32[None]
    axes = tuple(range(1, xg.ndim - 1))
    n = math.prod(xg.shape[1:-1])
    if n < 2:
      raise ValueError(
          'BatchNorm: expected more than 1 value per channel in training mode '
          f'(input shape {x.shape}, norm_group_size {g})'
      )
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)  # biased, used to normalise
    y = (xg - mean) * (scale * jax.lax.rsqrt(var + self.epsilon))
    if bias is not None:
      y = y + bias
    y = y.reshape(x.shape)

    if not self.is_initializing():
      group_mean = mean.reshape(-1, c).mean(axis=0)
      group_var = var.reshape(-1, c).mean(axis=0) * (n / (n - 1))  # unbiased, as PyTorch
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1.0 - m) * group_mean
      ra_var.value = m * ra_var.value + (1.0 - m) * group_var
    return y.astype(self.dtype)


class InstanceNorm(nn.Module):
  """`nn.InstanceNorm2d(affine=True)`: per-image, per-channel statistics, also at eval time."""

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Convolutions


def batch_norm(
    name: str,
    train: bool,
    dtype: Dtype = jnp.float32,
    group_size: int = 0,
    scale_init: Callable = nn.initializers.ones,
    use_bias: bool = True,
) -> BatchNorm:
  """A `BatchNorm` in train (batch statistics) or eval (running statistics) mode: the one way
  every network here builds one."""
  return BatchNorm(
      use_running_average=not train,
      use_bias=use_bias,
      dtype=dtype,
      group_size=group_size,
      scale_init=scale_init,
      name=name,
  )


POINTWISE_IMPLS = ('auto', 'dot', 'xla')
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general(
    lhs: Array,
    rhs: Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    pointwise_impl: str = 'auto',
) -> Array:
  """`lax.conv_general_dilated`, with 1x1 convolutions as a matrix product over channels.

  A 1x1 convolution is `x[:, ::s, ::s] @ kernel[0, 0]`. XLA:CPU computes its kernel gradient as a
  convolution whose batch is the input channels, after transposing the activations and output
  gradients to a channel-major layout; as a product contracting batch and space it is a plain
  matrix product with one transposed operand, several times faster on the CPU
  (docs/performance.md). pointwise_impl='auto' takes the product
  when tracing for the CPU and XLA's convolution elsewhere (GPU / TPU compilers already lower 1x1
  convolutions to matrix products); both are equal to float rounding (tested). Every other
  convolution goes to `lax.conv_general_dilated` unchanged.
  """
  if pointwise_impl not in POINTWISE_IMPLS:
    raise ValueError(f'pointwise impl must be one of {POINTWISE_IMPLS}, got {pointwise_impl!r}')
  if pointwise_impl == 'auto':
    pointwise_impl = 'dot' if jax.default_backend() == 'cpu' else 'xla'
  unit = lambda v: v is None or all(d == 1 for d in v)
  pointwise = (
      pointwise_impl == 'dot'
      and lhs.ndim == 4
      and rhs.shape[:2] == (1, 1)
      and feature_group_count == 1
      and unit(lhs_dilation)
      and unit(rhs_dilation)
      and (
          padding == 'VALID' or (not isinstance(padding, str) and all(p == (0, 0) for p in padding))
      )
      and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  if not pointwise:
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
  sh, sw = window_strides
  x = lhs[:, ::sh, ::sw] if (sh, sw) != (1, 1) else lhs
  return jax.lax.dot_general(
      x,
      rhs[0, 0],
      (((3,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=preferred_element_type,
  )


def conv2d(
    features: int,
    kernel: int,
    stride: int,
    pad: int,
    dtype,
    init=conv_init_fan_out,
    name: str | None = None,
    use_bias: bool = False,
    pointwise_as_dot: bool = False,
) -> nn.Conv:
  """`nn.Conv2d(kernel, stride, padding=pad)`: explicit symmetric padding, float32 parameters.

  pointwise_as_dot: 1x1 convolutions as matrix products on the CPU (`conv_general`). ResNet's
  bottlenecks take it (train step 33% faster at 256x128 batch 16); OSNet and MobileNetV2 do not:
  their 1x1 layers read depthwise outputs, and the product's kernel gradient then transposes a
  fused depthwise sum, which made their steps 24% and 44% slower
  (experiments/benchmarks/results_benchmark.md).
  """
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=init,
      name=name,
      conv_general_dilated=conv_general if pointwise_as_dot else None,
  )


DEPTHWISE_IMPLS = ('auto', 'shifted', 'dense', 'xla')
# On the CPU, the backward pass of depthwise layers with at most this many channels is that of a
# dense convolution with a block-diagonal kernel (see `depthwise_conv`).
DEPTHWISE_DENSE_MAX_CHANNELS = 32


def depthwise_conv(
    x: Array, kernel: Array, stride: int = 1, padding: int = 1, impl: str = 'auto'
) -> Array:
  """Depthwise convolution (`groups = channels`): x (B, H, W, C), kernel (kh, kw, 1, C).

  impl='xla': `lax.conv_general_dilated(feature_group_count=C)`. impl='shifted': the same sum
  written as kh * kw shifted multiply-adds (pad, strided slice, multiply by `kernel[i, j]`, add),
  accumulated in float32. impl='dense': a plain convolution whose (kh, kw, C, C) kernel is zero off
  the channel diagonal, accumulated in float32: C times the arithmetic, but one library call.

  XLA:CPU lowers grouped convolutions to a slow generic loop. The shifted form's forward is
  fast, but differentiated inside a network XLA fuses the neighbouring BatchNorm / ReLU / padding
  work into each of the nine slices and kernel-gradient reductions and recomputes it there. So
  impl='auto', when tracing for the CPU, computes the shifted forward everywhere and gives it a
  backward over operands computed once: for layers of at most `DEPTHWISE_DENSE_MAX_CHANNELS`
  channels, the gradients of the dense form (a library convolution); above, a hand-written
  shifted backward behind optimisation barriers; this split was the fastest of the forms tried
  (docs/performance.md has the A/B). Other backends take 'xla' (GPUs and TPUs have
  fast depthwise kernels). Every form equals a grouped convolution to float rounding (tested).
  """
  kh, kw, one, c = kernel.shape
  if one != 1 or c != x.shape[-1]:
    raise ValueError(f'depthwise kernel {kernel.shape} does not match input channels {x.shape[-1]}')
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      impl = 'xla'
    elif c <= DEPTHWISE_DENSE_MAX_CHANNELS:
      return _depthwise_shifted_dense_backward(x, kernel, stride, padding)
    else:
      return _depthwise_shifted_own_backward(x, kernel, stride, padding)
  if impl in ('xla', 'dense'):
    dense = impl == 'dense'
    if dense:  # (kh, kw, C, C), kernel[i, j, 0, c] on the diagonal
      kernel = kernel[:, :, 0, :, None] * jnp.eye(c, dtype=kernel.dtype)
    y = jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=1 if dense else c,
        preferred_element_type=jnp.float32 if dense else None,
    )
    return y.astype(x.dtype)
  if impl != 'shifted':
    raise ValueError(f'depthwise impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}')
  ho, wo = _depthwise_out_size(x.shape, kernel.shape, stride, padding)
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return _shifted_taps(xp, kernel, ho, wo, stride).astype(x.dtype)


def _depthwise_out_size(x_shape, kernel_shape, stride, padding):
  h, w = x_shape[1:3]
  kh, kw = kernel_shape[:2]
  return (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def _tap_patches(xp: Array, kh: int, kw: int, ho: int, wo: int, stride: int):
  """(i, j, xp[:, i + stride * y, j + stride * x]) for every kernel tap of a padded `xp`."""
  b, _, _, c = xp.shape
  for i in range(kh):
    for j in range(kw):
      end = (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c)
      yield i, j, jax.lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1))


def _shifted_taps(xp: Array, kernel: Array, ho: int, wo: int, stride: int) -> Array:
  """sum_ij kernel[i, j] * xp[:, i + stride * y, j + stride * x] for an already padded `xp`, in
  float32."""
  k32 = kernel.astype(jnp.float32)
  out = None
  for i, j, patch in _tap_patches(xp, *kernel.shape[:2], ho, wo, stride):
    term = patch.astype(jnp.float32) * k32[i, j, 0]
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifted_dense_backward(x, kernel, stride, padding):
  """The shifted depthwise forward, differentiated as the dense block-diagonal convolution (the
  same function, so the same gradients to float rounding; why: `depthwise_conv`)."""
  return depthwise_conv(x, kernel, stride, padding, 'shifted')


def _depthwise_sdb_fwd(x, kernel, stride, padding):
  return depthwise_conv(x, kernel, stride, padding, 'shifted'), (x, kernel)


def _depthwise_sdb_bwd(stride, padding, residuals, g):
  dense = lambda x, k: depthwise_conv(x, k, stride, padding, 'dense')
  return jax.vjp(dense, *residuals)[1](g)


_depthwise_shifted_dense_backward.defvjp(_depthwise_sdb_fwd, _depthwise_sdb_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifted_own_backward(x, kernel, stride, padding):
  """The shifted depthwise forward with a hand-written backward over materialised operands.

  The padded input (forward) and the padded, dilated output gradient (backward) are each computed
  once behind an optimisation barrier, so XLA cannot fuse their producers (BatchNorm, ReLU) into
  the nine slices that read them; the input gradient is the shifted form of that gradient with the
  flipped kernel, the kernel gradient nine products of slices, reduced.
  """
  return depthwise_conv(x, kernel, stride, padding, 'shifted')


def _depthwise_sob_fwd(x, kernel, stride, padding):
  ho, wo = _depthwise_out_size(x.shape, kernel.shape, stride, padding)
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  xp = jax.lax.optimization_barrier(jnp.pad(x, pad))
  return _shifted_taps(xp, kernel, ho, wo, stride).astype(x.dtype), (xp, kernel)


def _depthwise_sob_bwd(stride, padding, residuals, g):
  xp, kernel = residuals
  hp, wp = xp.shape[1:3]
  kh, kw = kernel.shape[:2]
  h, w = hp - 2 * padding, wp - 2 * padding
  ho, wo = g.shape[1:3]
  # dx[y] = sum_i k[i] g[(y + padding - i) / stride]: the stride-1 correlation of g, dilated by
  # the stride and padded so that the output has the input's size, with the flipped kernel.
  lo_h, lo_w = kh - 1 - padding, kw - 1 - padding
  hi_h = h + kh - 1 - lo_h - ((ho - 1) * stride + 1)
  hi_w = w + kw - 1 - lo_w - ((wo - 1) * stride + 1)
  zero = jnp.zeros((), g.dtype)
  config = ((0, 0, 0), (lo_h, hi_h, stride - 1), (lo_w, hi_w, stride - 1), (0, 0, 0))
  gp = jax.lax.optimization_barrier(jax.lax.pad(g, zero, config))
  dx = _shifted_taps(gp, kernel[::-1, ::-1], h, w, 1).astype(xp.dtype)
  g32 = g.astype(jnp.float32)
  dk = [
      jnp.sum(patch.astype(jnp.float32) * g32, axis=(0, 1, 2))
      for _, _, patch in _tap_patches(xp, kh, kw, ho, wo, stride)
  ]
  return dx, jnp.stack(dk).reshape(kernel.shape).astype(kernel.dtype)


_depthwise_shifted_own_backward.defvjp(_depthwise_sob_fwd, _depthwise_sob_bwd)


class DepthwiseConv(nn.Module):
  """`nn.Conv2d(C, C, k, stride, padding, groups=C, bias=False)`; kernel (k, k, 1, C) as Flax's
  grouped `nn.Conv` stores it (so converted checkpoints are the same either way)."""

  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  dtype: Dtype = jnp.float32
  kernel_init: Callable = conv_init_fan_out
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, 1, x.shape[-1]), jnp.float32)
    return depthwise_conv(
        x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding, self.impl
    )


ACTIVATIONS = {'relu': nn.relu, 'relu6': nn.relu6, 'none': lambda x: x}


class ConvBN(nn.Module):
  """conv (no bias; depthwise when `depthwise`) -> BN -> activation: torchreid's ConvLayer /
  Conv1x1 / Conv1x1Linear and torchvision's Conv2dNormActivation. Children `conv`, `bn`."""

  features: int
  kernel: int = 1
  stride: int = 1
  pad: int = 0
  act: str = 'relu'
  depthwise: bool = False
  dtype: Dtype = jnp.float32
  norm_group_size: int = 0
  kernel_init: Callable = conv_init_fan_out
  bn_scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.depthwise:
      if self.features != x.shape[-1]:
        raise ValueError(f'depthwise ConvBN: {self.features} outputs for {x.shape[-1]} inputs')
      x = DepthwiseConv(
          self.kernel, self.stride, self.pad, self.dtype, self.kernel_init, name='conv'
      )(x)
    else:
      x = conv2d(
          self.features, self.kernel, self.stride, self.pad, self.dtype, self.kernel_init, 'conv'
      )(x)
    x = batch_norm('bn', train, self.dtype, self.norm_group_size, self.bn_scale_init)(x)
    return ACTIVATIONS[self.act](x)
