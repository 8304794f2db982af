"""Backbones and heads (docs/reference.md section 1): shapes, output semantics, BN details, helpers.

Shape checks of full-width networks use `jax.eval_shape` (nothing computed); numerical checks use
tiny widths so the file runs in seconds on a CPU.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxreid import flops
from jaxreid import layers
from jaxreid import models
from jaxreid import numpy_init

KEY = jax.random.key(0)
# Tests compile many small programs on a CPU: XLA's backend optimisation is not worth its
# compile time here (about 2x faster to compile, same float32 arithmetic). Forward passes only:
# XLA:CPU at level 0 has returned a wrong gradient for an ABMT step (tests/test_step_parity.py
# compiles with the default level).
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _x(b=4, h=64, w=32, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, h, w, 3))


@functools.lru_cache(maxsize=None)
def _eval_fn(model, capture=False):
  return _jit(lambda v, x: model.apply(v, x, capture_intermediates=capture))


@functools.lru_cache(maxsize=None)
def _train_fn(model):
  return _jit(lambda v, x, rngs: model.apply(v, x, train=True, mutable=['batch_stats'], rngs=rngs))


def _eval(model, v, x, capture=False):
  return _eval_fn(model, capture)(v, x)


def _train(model, v, x, rng=None):
  return _train_fn(model)(v, x, {} if rng is None else {'dropout': rng})


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize('depth,dim', [(18, 512), (34, 512), (50, 2048), (101, 2048)])
def test_output_shapes_full_width(depth, dim):
  model = models.ReIDNet(depth=depth, num_classes=700)
  v = models.abstract_variables(model, 256, 128)
  x = jax.ShapeDtypeStruct((2, 256, 128, 3), jnp.float32)
  ev = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
  assert ev.shape == (2, dim) and ev.dtype == jnp.float32
  tr, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), v, x)
  assert tr['features'].shape == (2, dim) and tr['logits'].shape == (2, 700)
  assert tr['features'].dtype == tr['logits'].dtype == jnp.float32
  assert models.embedding_dim(model) == dim
  assert v['params']['classifier']['kernel'].shape == (dim, 700)


def test_resnet50_param_count_matches_torchvision():
  v = models.abstract_variables(models.ReIDNet(depth=50, num_classes=1024))
  backbone = models.count_params(v['params']['backbone'])
  # torchvision resnet50: 25,557,032 parameters, of which fc has 2048 * 1000 + 1000.
  assert backbone == 25_557_032 - 2_049_000
  assert models.count_params(v['params']) == backbone + 2048 + 2048 * 1024


def test_last_stride_one_gives_16x8_map():
  x = jax.ShapeDtypeStruct((1, 256, 128, 3), jnp.float32)
  for last_stride, hw in ((1, (16, 8)), (2, (8, 4))):
    trunk = models.ResNetTrunk(depth=50, last_stride=last_stride)
    out, _ = jax.eval_shape(lambda x: trunk.init_with_output(KEY, x), x)
    assert out.shape == (1,) + hw + (2048,)
  layer3 = models.ResNetTrunk(depth=50, stages=(0, 1, 2, 3))
  out, _ = jax.eval_shape(lambda x: layer3.init_with_output(KEY, x), x)
  assert out.shape == (1, 16, 8, 1024)


def test_abmt_shapes_and_param_names():
  model = models.ABMTNet(depth=50, num_classes=100)
  v = models.abstract_variables(model, 256, 128)
  p = v['params']
  assert set(p) == {
      'backbone',
      'avg_branch',
      'max_branch',
      'avg_neck',
      'max_neck',
      'avg_classifier',
      'max_classifier',
  }
  assert not any(k.startswith('layer4') for k in p['backbone'])
  assert set(p['avg_branch']) == {'layer4_0', 'layer4_1', 'layer4_2'}
  assert set(p['max_branch']) == {'layer4_0', 'layer4_1', 'layer4_2', 'extra'}
  extra = _shapes(p['max_branch']['extra'])
  assert extra['conv1']['kernel'] == (1, 1, 2048, 512)
  assert extra['conv2']['kernel'] == (3, 3, 512, 512)
  assert extra['conv3']['kernel'] == (1, 1, 512, 2048)
  assert 'downsample_conv' not in extra  # identity shortcut
  x = jax.ShapeDtypeStruct((2, 256, 128, 3), jnp.float32)
  assert jax.eval_shape(lambda v, x: model.apply(v, x), v, x).shape == (2, 4096)
  tr, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), v, x)
  assert {k: v.shape for k, v in tr.items()} == {
      'avg/features': (2, 2048),
      'avg/logits': (2, 100),
      'max/features': (2, 2048),
      'max/logits': (2, 100),
  }
  assert models.embedding_dim(model) == 4096


def test_necks_have_no_bias():
  for model in (
      models.ReIDNet(depth=18, width=8, num_classes=5),
      models.ABMTNet(depth=18, width=8, num_classes=5),
  ):
    p = models.abstract_variables(model, 64, 32)['params']
    for name in [k for k in p if k.endswith('neck')]:
      assert set(p[name]) == {'scale'}, name
    assert all(set(p[k]) == {'kernel'} for k in p if k.endswith('classifier'))


def test_ibn_layout_and_stem_relu_default():
  p = models.abstract_variables(models.ReIDNet(depth=50, width=16, ibn=True), 64, 32)['params']
  bb = p['backbone']
  for s, planes in ((1, 16), (2, 32), (3, 64)):
    bn1 = _shapes(bb[f'layer{s}_0']['bn1'])
    assert bn1 == {
        'IN': {'scale': (planes // 2,), 'bias': (planes // 2,)},
        'BN': {'scale': (planes - planes // 2,), 'bias': (planes - planes // 2,)},
    }
  assert set(bb['layer4_0']['bn1']) == {'scale', 'bias'}
  # stem ReLU (only for IBN by default): with a negative BN bias the stem output is negative
  # without the ReLU and exactly 0 with it.
  x = _x(2, 32, 16)
  for relu in (False, True):
    trunk = models.ResNetTrunk(depth=50, width=4, stem_relu=relu, stages=(0,))
    v = numpy_init.init_variables(trunk, example=x)
    v['params']['bn1']['bias'] -= 100.0
    out = _eval(trunk, v, x)
    assert bool(jnp.all(out == 0)) if relu else bool(jnp.all(out < 0))
  assert models.ReIDNet(ibn=True).stem_relu is None  # resolved to `ibn` inside


@pytest.fixture(scope='module')
def tiny():
  model = models.ReIDNet(depth=18, width=4, num_classes=6)
  x = _x(4, 64, 32)
  v = numpy_init.init_variables(model)
  # non-trivial neck running statistics and scale, so eval differs from train
  v['batch_stats']['neck']['mean'] = np.linspace(-0.5, 0.5, 32, dtype=np.float32)
  v['batch_stats']['neck']['var'] = np.linspace(0.5, 2.0, 32, dtype=np.float32)
  v['params']['neck']['scale'] = np.linspace(0.5, 1.5, 32, dtype=np.float32)
  return model, v, x


def test_eval_is_unit_norm_post_bn_feature(tiny):
  model, v, x = tiny
  e, inter = _eval(model, v, x, capture=True)
  assert e.shape == (4, 32) and e.dtype == jnp.float32
  np.testing.assert_allclose(_eval(model, v, x), e, atol=1e-6)  # (compiled once for bf16 too)
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
  fmap = inter['intermediates']['backbone']['__call__'][0]
  f = fmap.mean(axis=(1, 2))
  bs, p = v['batch_stats']['neck'], v['params']['neck']
  bn = (f - bs['mean']) / jnp.sqrt(bs['var'] + 1e-5) * p['scale']
  np.testing.assert_allclose(e, bn / jnp.linalg.norm(bn, axis=1, keepdims=True), atol=1e-5)


def test_train_gives_pre_bn_features_and_logits_from_post_bn(tiny):
  model, v, x = tiny
  out, upd = _train(model, v, x)
  f, z = out['features'], out['logits']
  assert f.shape == (4, 32) and z.shape == (4, 6)
  assert float(f.min()) >= 0  # pooled ReLU outputs: pre-BN
  bn = (f - f.mean(0)) / jnp.sqrt(f.var(0) + 1e-5) * v['params']['neck']['scale']
  np.testing.assert_allclose(z, bn @ v['params']['classifier']['kernel'], atol=1e-5)
  # the neck's running statistics moved (momentum 0.1), with the unbiased variance
  np.testing.assert_allclose(
      upd['batch_stats']['neck']['mean'],
      0.9 * v['batch_stats']['neck']['mean'] + 0.1 * f.mean(0),
      atol=1e-5,
  )
  np.testing.assert_allclose(
      upd['batch_stats']['neck']['var'],
      0.9 * v['batch_stats']['neck']['var'] + 0.1 * np.var(f, 0, ddof=1),
      rtol=1e-4,
      atol=1e-6,
  )


def test_dropout_needs_rng_and_changes_logits():
  model = models.ReIDNet(depth=18, width=4, num_classes=6, dropout=0.5)
  x = _x(4, 32, 16)
  v = numpy_init.init_variables(model)
  o1, _ = _train(model, v, x, KEY)
  o2, _ = _train(model, v, x, jax.random.key(5))
  np.testing.assert_allclose(o1['features'], o2['features'])
  assert not np.allclose(o1['logits'], o2['logits'])
  with pytest.raises(Exception, match='dropout'):
    _train(model, v, x)


def test_batchnorm_unbiased_running_var_and_float32_stats():
  x = jax.random.normal(KEY, (3, 5, 4, 6), jnp.bfloat16) * 3 + 1
  bn = layers.BatchNorm(dtype=jnp.bfloat16)
  v = numpy_init.init_variables(bn, example=x)
  y, upd = _jit(lambda v, x: bn.apply(v, x, mutable=['batch_stats']))(v, x)
  assert y.dtype == jnp.bfloat16 and upd['batch_stats']['var'].dtype == jnp.float32
  xf = np.asarray(x, np.float32).reshape(-1, 6)
  np.testing.assert_allclose(upd['batch_stats']['mean'], 0.1 * xf.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 + 0.1 * xf.var(0, ddof=1), rtol=1e-5)
  assert set(v['params']) == {'scale', 'bias'}


class _StemLayer1(models.nn.Module):
  """Stem + layer1 (IBN) + a neck: every kind of norm layer, small enough to compile fast."""

  norm_group_size: int = 0

  @models.nn.compact
  def __call__(self, x, train=False):
    t = models.ResNetTrunk(
        depth=50, width=4, ibn=True, stages=(0, 1), norm_group_size=self.norm_group_size
    )(x, train)
    return models._neck('neck', train, self.norm_group_size)(t.mean(axis=(1, 2)))


def test_norm_group_size_equals_separate_groups():
  grouped, plain = _StemLayer1(norm_group_size=2), _StemLayer1()
  x = _x(4, 32, 16)
  v = numpy_init.init_variables(plain)
  v['params']['ResNetTrunk_0']['bn1']['bias'] += 0.3  # keep some pre-neck features non-zero
  run = lambda m, x: _jit(lambda v, x: m.apply(v, x, True, mutable=['batch_stats']))(v, x)
  out_g, upd_g = run(grouped, x)
  parts = [run(plain, x[i : i + 2]) for i in (0, 2)]
  np.testing.assert_allclose(out_g, jnp.concatenate([p[0] for p in parts]), rtol=1e-4, atol=1e-5)
  mean_stats = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), upd_g, mean_stats
  )
  with pytest.raises(ValueError, match='multiple of norm_group_size'):
    _StemLayer1(norm_group_size=3).apply(v, x, True, mutable=['batch_stats'])
  # the flag reaches every BN of the full networks (checked on shapes only)
  m = models.ReIDNet(depth=18, width=4, norm_group_size=3, num_classes=2)
  with pytest.raises(ValueError, match='multiple of norm_group_size'):
    jax.eval_shape(
        lambda v, x: m.apply(v, x, train=True, mutable=['batch_stats']),
        models.abstract_variables(m, 32, 16),
        jax.ShapeDtypeStruct((4, 32, 16, 3), jnp.float32),
    )


def test_bfloat16_compute_matches_float32():
  kw = dict(depth=18, width=4, num_classes=6)  # as the `tiny` fixture: shares its compilation
  m32 = models.ReIDNet(**kw)
  m16 = models.ReIDNet(dtype=jnp.bfloat16, **kw)
  x = _x(4, 64, 32)
  v = numpy_init.init_variables(m32)
  rng = np.random.default_rng(0)  # running statistics of a plausible scale
  v['batch_stats'] = jax.tree_util.tree_map(
      lambda a: (
          rng.uniform(0.5, 2.0, a.shape) * a.mean() + 0.1 * rng.normal(size=a.shape)
          if a.mean() > 0
          else 0.1 * rng.normal(size=a.shape)
      ).astype(np.float32),
      v['batch_stats'],
  )
  assert jax.tree_util.tree_all(
      jax.tree_util.tree_map(
          lambda a: a.dtype == jnp.float32, models.abstract_variables(m16, 64, 32)
      )
  )  # f32 params
  e32, e16 = _eval(m32, v, x), _eval(m16, v, x)
  assert e16.dtype == jnp.float32
  # unit vectors: bfloat16 (8-bit mantissa) through 16 conv layers; stated tolerance
  assert float(jnp.max(jnp.abs(e32 - e16))) < 0.03
  assert float(jnp.min(jnp.sum(e32 * e16, axis=1))) > 0.998


def test_abmt_outputs_tiny():
  model = models.ABMTNet(depth=18, width=4, num_classes=6)
  x = _x(4, 32, 16)
  v = numpy_init.init_variables(model)
  assert v['params']['max_branch']['extra']['conv2']['kernel'].shape == (3, 3, 8, 8)
  e = _eval(model, v, x)  # train-mode outputs: shapes above, numbers in test_convert (torch)
  assert e.shape == (4, 64)
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
  # both halves are post-BN features of their own branch: not proportional
  assert not np.allclose(
      e[:, :32] / np.linalg.norm(e[:, :32], axis=1, keepdims=True),
      e[:, 32:] / np.linalg.norm(e[:, 32:], axis=1, keepdims=True),
  )
  sub = numpy_init.init_variables(model, paths=[('params', 'max_classifier', 'kernel')])
  np.testing.assert_array_equal(
      sub['params']['max_classifier']['kernel'], v['params']['max_classifier']['kernel']
  )
  # model.init's extra-block initialisers (init_variables draws other numbers from the same law)
  extra = models._extra_block(2048, jnp.float32, 0)
  assert extra.kernel_init is layers.conv_init_fan_in
  assert extra.bn_scale_init is layers.bn_scale_init_abmt
  scale = layers.bn_scale_init_abmt(KEY, (4096,))
  assert abs(float(scale.std()) - 0.02) < 0.002 and abs(float(scale.mean()) - 1) < 0.002
  kernel = layers.conv_init_fan_in(KEY, (1, 1, 2048, 512))
  assert abs(float(kernel.std()) - np.sqrt(2 / 2048)) < 0.02 * np.sqrt(2 / 2048)
  ev = v['params']['max_branch']['extra']
  assert abs(float(ev['conv1']['kernel'].std()) - np.sqrt(2 / 32)) < 0.2 * np.sqrt(2 / 32)
  assert float(np.abs(ev['bn3']['bias']).max()) == 0 and float(ev['bn1']['scale'].std()) > 0


def test_set_classifier_rows_and_mask():
  model = models.ReIDNet(depth=18, width=4, num_classes=8)
  v = numpy_init.init_variables(model)
  cent = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
  new = _jit(models.set_classifier_rows)(v['params'], cent)
  k = np.asarray(new['classifier']['kernel'])
  np.testing.assert_allclose(
      k[:, :3].T, cent / np.linalg.norm(cent, axis=1, keepdims=True), rtol=1e-5, atol=1e-6
  )
  assert np.all(k[:, 3:] == 0)
  np.testing.assert_array_equal(new['neck']['scale'], v['params']['neck']['scale'])
  # full variables dict in, same structure out
  full = models.set_classifier_rows(v, cent)
  np.testing.assert_array_equal(full['params']['classifier']['kernel'], k)
  assert 'batch_stats' in full
  with pytest.raises(ValueError, match='num_classes'):
    models.set_classifier_rows(v['params'], np.ones((9, 32)))
  np.testing.assert_array_equal(models.class_mask(3, 8), np.arange(8) < 3)
  assert _jit(models.class_mask, static_argnums=1)(jnp.int32(5), 8).sum() == 5


def test_set_classifier_rows_abmt_halves():
  model = models.ABMTNet(depth=18, width=4, num_classes=5)
  v = numpy_init.init_variables(model)
  cent = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
  new = models.set_classifier_rows(v['params'], cent)
  for name, part in (('avg_classifier', cent[:, :32]), ('max_classifier', cent[:, 32:])):
    k = np.asarray(new[name]['kernel'])
    np.testing.assert_allclose(
        k[:, :4].T, part / np.linalg.norm(part, axis=1, keepdims=True), rtol=1e-5, atol=1e-6
    )
    assert np.all(k[:, 4:] == 0)


def test_create_model_and_errors():
  cfg = ml_collections.ConfigDict(
      dict(arch='abmt', depth=50, width=16, ibn=True, dtype='bfloat16', num_classes=10)
  )
  m = models.create_model(cfg)
  assert isinstance(m, models.ABMTNet) and m.dtype == jnp.bfloat16 and m.width == 16
  m = models.create_model(dict(depth=18), width=8)
  assert isinstance(m, models.ReIDNet) and (m.depth, m.width) == (18, 8)
  assert isinstance(models.create_model(arch='resnet'), models.ReIDNet)
  with pytest.raises(ValueError, match='unknown model keys'):
    models.create_model(dict(depht=50))
  with pytest.raises(ValueError, match='arch'):
    models.create_model(arch='vit')
  with pytest.raises(ValueError, match='pooling'):
    models.abstract_variables(models.ReIDNet(depth=18, width=4, pooling='mean'), 32, 16)


def test_pooling_variants():
  fmap = jnp.abs(_x(2, 4, 3))
  flat = np.asarray(fmap).reshape(2, -1, 3)
  np.testing.assert_allclose(models.global_pool(fmap, 'avg'), flat.mean(1), rtol=1e-6)
  np.testing.assert_allclose(models.global_pool(fmap, 'max'), flat.max(1), rtol=1e-6)
  np.testing.assert_allclose(
      models.global_pool(fmap, 'gem'), np.mean(flat**3, 1) ** (1 / 3), rtol=1e-5
  )
  for pooling in ('avg', 'max', 'gem'):
    model = models.ReIDNet(depth=18, width=4, num_classes=3, pooling=pooling)
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x),
        models.abstract_variables(model, 32, 16),
        jax.ShapeDtypeStruct((2, 32, 16, 3), jnp.float32),
    )
    assert out.shape == (2, 32)


def test_flops_and_report():
  r50 = models.ReIDNet(depth=50, last_stride=2, num_classes=1000)
  # ImageNet setting: 4.09 GMACs (the published "4.1 GFLOPs" counts multiply-adds)
  assert abs(flops.flops_per_image(r50, 224, 224) / 2e9 - 4.09) < 0.03
  table = flops.model_report(models=flops.REPORT_MODELS[:1])
  assert 'ResNet-18' in table and '16x8' in table


@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_conv_as_product_equals_convolution_and_its_gradients(stride):
  # A 1x1 convolution written as `x[:, ::s, ::s] @ kernel[0, 0]` against XLA's convolution
  # (the textbook definition), values and both gradients, odd sizes so stride 2 drops a border.
  kx, kk, kg = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (2, 9, 7, 6))
  k = jax.random.normal(kk, (1, 1, 6, 5))
  dims = jax.lax.conv_dimension_numbers(x.shape, k.shape, ('NHWC', 'HWIO', 'NHWC'))

  def conv(x, k, impl):
    return layers.conv_general(
        x, k, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=dims, pointwise_impl=impl
    )

  y = conv(x, k, 'dot')
  ref = jax.lax.conv_general_dilated(
      x, k, (stride, stride), 'VALID', dimension_numbers=dims, precision='highest'
  )
  assert y.shape == ref.shape == (2, 5 if stride == 2 else 9, 4 if stride == 2 else 7, 5)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  grads = jax.grad(lambda x, k: jnp.sum(conv(x, k, 'dot') * g), argnums=(0, 1))(x, k)
  grads_ref = jax.grad(lambda x, k: jnp.sum(conv(x, k, 'xla') * g), argnums=(0, 1))(x, k)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, atol=1e-4)
  if stride == 2:  # the input gradient is zero off the sampled pixels
    assert float(jnp.abs(grads[0][:, 1::2]).max()) == 0.0
    assert float(jnp.abs(grads[0][:, :, 1::2]).max()) == 0.0


def test_pointwise_conv_leaves_other_convolutions_to_xla():
  # 3x3, padded, grouped: not a plain product, so conv_general must give XLA's result exactly.
  x = jax.random.normal(jax.random.key(4), (1, 6, 5, 4))
  for shape, pad, groups in (
      ((3, 3, 4, 2), ((1, 1), (1, 1)), 1),
      ((1, 1, 4, 2), ((1, 1), (0, 0)), 1),
      ((1, 1, 2, 4), ((0, 0), (0, 0)), 2),
  ):
    k = jax.random.normal(jax.random.key(5), shape)
    dims = jax.lax.conv_dimension_numbers(x.shape, k.shape, ('NHWC', 'HWIO', 'NHWC'))
    args = (x, k, (1, 1), pad)
    kw = dict(dimension_numbers=dims, feature_group_count=groups)
    np.testing.assert_array_equal(
        layers.conv_general(*args, **kw, pointwise_impl='dot'),
        jax.lax.conv_general_dilated(*args, **kw),
    )
  with pytest.raises(ValueError, match='pointwise impl'):
    layers.conv_general(*args, **kw, pointwise_impl='fast')
