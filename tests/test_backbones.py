"""OSNet and MobileNetV2: the fast depthwise convolution, parity with the PyTorch networks on
real images and real published weights (../shared), export back to PyTorch, and bad input.

The PyTorch references (tests/torch_reference.py) are plain torch modules with torchreid's and
torchvision's exact state-dict layouts; torch is optional (skipped without it)."""

import glob
import os
from pathlib import Path
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid import checkpoint
from jaxreid import convert
from jaxreid import export
from jaxreid import input_pipeline
from jaxreid import layers
from jaxreid import models
from jaxreid import numpy_init
from jaxreid.evaluator import Evaluator

SHARED = Path(__file__).resolve().parents[1].parent / 'shared'
WEIGHTS = SHARED / 'weights'
MARKET_QUERY = SHARED / 'data' / 'market1501' / 'query'
needs_shared = pytest.mark.skipif(
    not (WEIGHTS / 'osnet_x0_25_msmt17.pth').is_file() or not MARKET_QUERY.is_dir(),
    reason='no ../shared',
)


# ----------------------------------------------------------------------------------------------
# Depthwise convolution


@pytest.mark.parametrize(
    'impl, channels', [('shifted', 5), ('dense', 5), ('auto', 5), ('auto', 40)]
)
@pytest.mark.parametrize('stride', [1, 2])
def test_depthwise_impls_equal_grouped_convolution_and_its_gradients(stride, impl, channels):
  # 'auto' on the CPU: 5 channels take the dense backward, 40 the hand-written shifted one
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 9, 7, channels))
  k = jax.random.normal(kk, (3, 3, 1, channels))

  def ref(x, k):  # the textbook definition: a grouped convolution, groups = channels
    return jax.lax.conv_general_dilated(
        x,
        k,
        (stride, stride),
        ((1, 1), (1, 1)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=channels,
        precision=jax.lax.Precision.HIGHEST,
    )

  def fast(x, k):
    return layers.depthwise_conv(x, k, stride, 1, impl=impl)

  y = fast(x, k)
  np.testing.assert_allclose(y, ref(x, k), atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  grads = jax.grad(lambda x, k: jnp.sum(fast(x, k) * g), argnums=(0, 1))(x, k)
  grads_ref = jax.grad(lambda x, k: jnp.sum(ref(x, k) * g), argnums=(0, 1))(x, k)
  for a, b in zip(grads, grads_ref):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-4)
  # bfloat16 in and out, accumulated in float32: within bfloat16 rounding of the float32 result
  yb = fast(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
  assert yb.dtype == jnp.bfloat16
  xr, kr = (a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, k))
  np.testing.assert_allclose(np.float32(yb), ref(xr, kr), rtol=1e-2, atol=2e-2)


def test_depthwise_auto_impl_on_cpu(monkeypatch):
  """'auto' on the CPU: always the shifted forward; the backward of a dense block-diagonal
  convolution up to DEPTHWISE_DENSE_MAX_CHANNELS channels, the hand-written shifted backward
  above (read from the traced programs' operations)."""

  def ops(c, grad):
    x = jnp.zeros((1, 6, 6, c))
    k = jnp.zeros((3, 3, 1, c))
    fn = lambda x, k: jnp.sum(layers.depthwise_conv(x, k))
    text = jax.jit(jax.grad(fn, argnums=(0, 1)) if grad else fn).lower(x, k).as_text()
    names = ('convolution', 'pad', 'optimization_barrier')
    return {op for op in names if f'stablehlo.{op}' in text}

  limit = layers.DEPTHWISE_DENSE_MAX_CHANNELS
  assert ops(limit, grad=False) == {'pad'} and ops(limit + 1, grad=False) == {'pad'}
  assert 'convolution' in ops(limit, grad=True)
  assert ops(limit + 1, grad=True) == {'pad', 'optimization_barrier'}
  monkeypatch.setattr(layers, 'DEPTHWISE_DENSE_MAX_CHANNELS', 0)
  assert ops(4, grad=True) == {'pad', 'optimization_barrier'}


def test_depthwise_one_hand_computed_value():
  # One channel, a 3x3 image 1..9, kernel with a single 1 at the top-left tap: with padding 1
  # the output at (i, j) is the input at (i - 1, j - 1), zero outside.
  x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
  k = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)
  y = layers.depthwise_conv(x, k, 1, 1, impl='shifted')[0, :, :, 0]
  np.testing.assert_array_equal(y, [[0, 0, 0], [0, 1, 2], [0, 4, 5]])


# ----------------------------------------------------------------------------------------------
# Parity with PyTorch


def _images(n=6):
  paths = np.array(sorted(glob.glob(str(MARKET_QUERY / '*.jpg')))[:n])
  return input_pipeline.decode_images(paths, 256, 128)


def _torch_features(net, images):
  import torch

  x = np.asarray(input_pipeline.normalize(images))
  with torch.no_grad():
    out = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  return out / np.linalg.norm(out, axis=1, keepdims=True)


def _jax_features(model, variables, images):
  return np.asarray(jax.jit(model.apply)(variables, input_pipeline.normalize(images)))


def _randomise_bn_statistics(net, seed=0):
  """Non-trivial running statistics, so that a mixed-up mean / var would show."""
  import torch

  g = torch.Generator().manual_seed(seed)
  for m in net.modules():
    if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
      m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
      m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
      m.weight.data.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
      m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
  return net


@needs_shared
@pytest.mark.parametrize('arch', ['resnet', 'abmt'])
def test_osnet_from_the_real_msmt17_checkpoint_matches_pytorch_on_real_images(arch):
  torch = pytest.importorskip('torch')
  import torch_reference as tr

  path = WEIGHTS / 'osnet_x0_25_msmt17.pth'
  net = tr.osnet_x0_25(num_classes=1041)
  net.load_state_dict(torch.load(path, weights_only=True), strict=True)
  images = _images()
  ref = _torch_features(net.eval(), images)
  model = models.create_model(arch=arch, backbone='osnet_x0_25', num_classes=1041)
  report = {}
  variables = checkpoint.load_weights(path, model, report=report)
  assert report['format'] == 'torchreid'
  feats = _jax_features(model, variables, images)
  if arch == 'abmt':  # the avg branch is the checkpoint's network; the max branch copies its
    # last stage, and only the extra block is new
    feats = feats[:, :512] / np.linalg.norm(feats[:, :512], axis=1, keepdims=True)
    p = variables['params']
    np.testing.assert_array_equal(
        p['max_branch']['conv5']['conv']['kernel'], p['avg_branch']['conv5']['conv']['kernel']
    )
    assert {k.split('/')[2] for k in report['fresh'] if 'max_branch' in k} == {'extra'}
  np.testing.assert_allclose(feats, ref, atol=1e-4)
  # the checkpoint's classifier fills the first 1041 rows
  np.testing.assert_allclose(
      variables['params']['classifier' if arch == 'resnet' else 'avg_classifier']['kernel'],
      net.classifier.weight.detach().numpy().T,
      atol=0,
  )


@needs_shared
def test_mobilenetv2_imagenet_features_match_pytorch_on_real_images():
  torch = pytest.importorskip('torch')
  import torch_reference as tr

  path = WEIGHTS / 'mobilenetv2_imagenet_features.pt'
  net = tr.mobilenet_v2()
  tr.load_legacy_features(net, torch.load(path, weights_only=True))
  images = _images()
  ref = _torch_features(lambda x: tr.features_forward(net.eval(), x), images)
  model = models.create_model(backbone='mobilenetv2', last_stride=2, num_classes=8)
  report = {}
  variables = checkpoint.load_weights(path, model, report=report)
  assert report['format'] == 'mobilenetv2_flat'
  # a fresh neck (mean 0, var 1) only scales by 1 / sqrt(1 + eps): no effect after normalising
  np.testing.assert_allclose(_jax_features(model, variables, images), ref, atol=1e-4)


@pytest.mark.parametrize('variant', ['osnet_x0_5', 'osnet_x1_0'])
def test_osnet_widths_convert_from_pytorch_state_dicts(variant):
  torch = pytest.importorskip('torch')
  import torch_reference as tr

  torch.manual_seed(0)
  net = _randomise_bn_statistics(getattr(tr, variant)(num_classes=7)).eval()
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  model = models.create_model(backbone=variant, num_classes=7)
  variables = convert.convert_state_dict(sd, model)
  images = np.random.default_rng(0).integers(0, 255, (2, 64, 32, 3), dtype=np.uint8)
  np.testing.assert_allclose(
      _jax_features(model, variables, images), _torch_features(net, images), atol=1e-4
  )


# ----------------------------------------------------------------------------------------------
# Export back to PyTorch


def _trained_looking(model, seed=0):
  """Variables with non-trivial values everywhere (BN statistics, neck, classifier)."""
  variables = numpy_init.init_variables(model, seed)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(variables)
  for path, v in flat.items():
    if path[-1] in ('scale', 'var'):
      flat[path] = (0.6 + rng.random(v.shape)).astype(np.float32)
    elif path[-1] in ('bias', 'mean'):
      flat[path] = (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _without_bn_neck(variables):
  """OSNet variables of head 'bnneck' less the BN neck: those of head 'fc_pre_bn', whose eval
  feature is the fc embedding."""
  return {
      c: {**tree, 'neck': {k: v for k, v in tree['neck'].items() if k != 'bn'}}
      for c, tree in variables.items()
  }


@pytest.mark.parametrize('head', models.HEADS)
def test_export_osnet_round_trip_into_the_torchreid_network(tmp_path, head):
  torch = pytest.importorskip('torch')
  import torch_reference as tr

  model = models.create_model(backbone='osnet_x0_25', num_classes=5, head=head)
  variables = _trained_looking(model)
  sd, notes = export.torch_state_dict(model, variables, 'torchreid')
  export.save_torch(str(tmp_path / 'm.pth'), sd)
  net = tr.osnet_x0_25(num_classes=5).eval()
  net.load_state_dict(torch.load(tmp_path / 'm.pth', weights_only=True), strict=True)
  assert 'num_classes=5' in notes[0]
  assert any(n == export.OSNET_FEATURE_NOTE[head] for n in notes)
  images = np.random.default_rng(1).integers(0, 255, (3, 64, 32, 3), dtype=np.uint8)
  x = torch.from_numpy(np.asarray(input_pipeline.normalize(images)).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    v = net(x).numpy()  # the file's feature: the fc embedding (eval mode)
    logits = net.classifier(torch.from_numpy(v)).numpy()
  # The file's feature is the fc embedding, which is jaxreid's eval feature under 'fc_pre_bn'
  # and the input of the BN neck under 'bnneck'.
  embedding_model = models.create_model(backbone='osnet_x0_25', num_classes=5, head='fc_pre_bn')
  fc_variables = _without_bn_neck(variables) if head == 'bnneck' else variables
  np.testing.assert_allclose(
      v / np.linalg.norm(v, axis=1, keepdims=True),
      _jax_features(embedding_model, fc_variables, images),
      atol=1e-4,
  )
  # The classifier's logits are jaxreid's: its rows read the neck output (hand-computed from v
  # with the neck's running statistics), the neck folded into the weight and bias.
  neck = v
  if head == 'bnneck':
    scale = variables['params']['neck']['bn']['scale']
    stats = variables['batch_stats']['neck']['bn']
    neck = (v - stats['mean']) * scale / np.sqrt(stats['var'] + 1e-5)
    np.testing.assert_allclose(
        neck / np.linalg.norm(neck, axis=1, keepdims=True),
        _jax_features(model, variables, images),
        atol=1e-4,
    )
  np.testing.assert_allclose(
      logits, neck @ variables['params']['classifier']['kernel'], rtol=1e-4, atol=1e-4
  )
  # And back again: the file converts to the same network (a fresh, identity BN neck, whose
  # evaluation scores the file's feature).
  report = {}
  again = checkpoint.load_weights(tmp_path / 'm.pth', model, report=report)
  assert report['fresh'] == (
      ['batch_stats/neck/bn/mean', 'batch_stats/neck/bn/var', 'params/neck/bn/scale']
      if head == 'bnneck'
      else []
  )
  flat_again, flat = traverse_util.flatten_dict(again), traverse_util.flatten_dict(variables)
  for path, value in flat.items():
    if path[1] != 'classifier' and path[2:3] != ('bn',):
      np.testing.assert_allclose(flat_again[path], value, atol=1e-7, err_msg=str(path))
  np.testing.assert_allclose(
      _jax_features(model, again, images), v / np.linalg.norm(v, axis=1, keepdims=True), atol=1e-4
  )


def test_export_mobilenetv2_folds_the_neck_and_keeps_last_stride_1(tmp_path):
  torch = pytest.importorskip('torch')
  import torch_reference as tr

  model = models.create_model(backbone='mobilenetv2', last_stride=1, num_classes=5)
  variables = _trained_looking(model)
  sd, notes = export.torch_state_dict(model, variables, 'torchvision')
  export.save_torch(str(tmp_path / 'm.pth'), sd)
  net = tr.mobilenet_v2(num_classes=1280)
  net.load_state_dict(torch.load(tmp_path / 'm.pth', weights_only=True), strict=True)
  assert any('stride = (1, 1)' in n for n in notes)
  tr.set_last_stride_1(net)
  images = np.random.default_rng(2).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
  np.testing.assert_allclose(
      _torch_features(net.eval(), images), _jax_features(model, variables, images), atol=1e-4
  )


def test_export_refuses_what_has_no_pytorch_twin():
  resnet = models.create_model(depth=18, width=8, num_classes=3)
  with pytest.raises(export.ExportError, match='ResNet models have no'):
    export.torch_state_dict(resnet, numpy_init.init_variables(resnet), 'torchreid')
  mbv2 = models.create_model(backbone='mobilenetv2', num_classes=3)
  with pytest.raises(export.ExportError, match='use --format=torchvision'):
    export.torch_state_dict(mbv2, {}, 'torchreid')
  abmt = models.create_model(arch='abmt', backbone='osnet_x0_25', num_classes=3)
  with pytest.raises(export.ExportError, match='--branch=avg'):
    export.torch_state_dict(abmt, {}, 'torchreid')


def test_abmt_avg_branch_exports_as_a_plain_osnet():
  abmt = models.create_model(arch='abmt', backbone='osnet_x0_25', num_classes=3)
  variables = _trained_looking(abmt)
  plain = models.create_model(backbone='osnet_x0_25', num_classes=3)
  branch = export.single_branch(variables, 'avg')
  images = np.random.default_rng(3).integers(0, 255, (2, 64, 32, 3), dtype=np.uint8)
  joint = _jax_features(abmt, variables, images)
  # the avg half of the joint feature, normalised, is the single-branch network's feature
  avg = joint[:, :512] / np.linalg.norm(joint[:, :512], axis=1, keepdims=True)
  np.testing.assert_allclose(_jax_features(plain, branch, images), avg, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input


@needs_shared
def test_wrong_osnet_width_or_backbone_names_the_one_to_use():
  path = str(WEIGHTS / 'osnet_x0_25_msmt17.pth')
  with pytest.raises(convert.ConversionError, match="use backbone 'osnet_x0_25'"):
    checkpoint.load_weights(path, models.create_model(backbone='osnet_x0_5'), key='config.init.x')
  with pytest.raises(convert.ConversionError, match=r'config.init.x=.*needs backbone'):
    checkpoint.load_weights(path, models.create_model(depth=18), key='config.init.x')


def test_load_weights_refuses_garbage_and_malicious_files_in_one_line(tmp_path):
  model = models.create_model(backbone='osnet_x0_25', num_classes=3)
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'\x80\x02' + os.urandom(64))  # a pickle header, then noise
  with pytest.raises(convert.ConversionError, match='junk.pth'):
    checkpoint.load_weights(str(junk), model, key='config.init.pretrained')
  text = tmp_path / 'notes.msgpack'
  text.write_text('hello')
  with pytest.raises(convert.ConversionError, match='not a jaxreid .msgpack'):
    checkpoint.load_weights(str(text), model)
  with pytest.raises(convert.ConversionError, match='does not exist'):
    checkpoint.load_weights(str(tmp_path / 'missing.pth'), model)


def test_export_command_line_errors_are_one_line(tmp_path):
  r = subprocess.run(
      [
          sys.executable,
          '-m',
          'jaxreid.tools.export',
          f'--model={tmp_path}',
          '--format=torchreid',
          f'--out={tmp_path / "x.pth"}',
      ],
      capture_output=True,
      text=True,
  )
  assert r.returncode == 2
  assert r.stderr.strip().startswith('error:') and 'Traceback' not in r.stderr
  assert not (tmp_path / 'x.pth').exists()


# ----------------------------------------------------------------------------------------------
# Training from a PyTorch re-ID model


@pytest.fixture()
def world_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXREID_DATA_CACHE', str(tmp_path / 'world'))


@pytest.mark.parametrize('method', ['mmt', 'abmt'])
def test_adaptation_starts_from_a_torchreid_file_without_source_pretraining(
    method, world_cache, tmp_path
):
  torch = pytest.importorskip('torch')
  import torch_reference as tr

  from configs import abmt as abmt_config
  from configs import mmt as mmt_config
  from jaxreid import run

  torch.manual_seed(0)
  net = _randomise_bn_statistics(tr.osnet_x0_25(num_classes=9))
  torch.save(net.state_dict(), tmp_path / 'osnet.pth')
  c = (mmt_config if method == 'mmt' else abmt_config).get_config()
  c.data.synthetic.update(dict(num_train_ids=12, num_test_ids=6, min_images=4, max_images=6))
  c.data.update(dict(height=64, width=32, batch_size=16, eval_batch_size=64))
  c.model.backbone = 'osnet_x0_25'
  c.init.update(dict(pretrained=str(tmp_path / 'osnet.pth'), skip_pretrain=True))
  c.cluster.update(dict(method='kmeans', num_clusters=6, lam=0.0))
  # MMT trains one epoch on OSNet; ABMT stops before its first epoch (train.epochs=0): its OSNet
  # step's XLA compilation alone cost minutes of the suite, and ABMT's training step is tested on
  # ResNet elsewhere. Both check what is specific to starting from a torchreid file.
  c.train.update(dict(epochs=1 if method == 'mmt' else 0, iters=2, eval_every=1))
  workdir = tmp_path / 'run'
  summary = run.train_and_evaluate(c, str(workdir))
  assert not list(workdir.glob('pretrain_seed*'))  # no source pre-training happened
  # The direct-transfer row is the PyTorch network's own features, evaluated.
  model = models.create_model(
      arch='abmt' if method == 'abmt' else 'resnet', backbone='osnet_x0_25', num_classes=9
  )
  variables = checkpoint.load_weights(tmp_path / 'osnet.pth', model)
  target = input_pipeline.load_and_decode(
      'synthetic_b', None, 64, 32, synthetic=c.data.synthetic.to_dict()
  )
  if method == 'abmt':  # a single-branch model: the max branch is warm-started (avg untouched)
    variables = run.warm_start_max_branch(model, variables, target.train, c.seed)
  from jaxreid import features

  expected = Evaluator.of_decoded(target).run(
      features.make_embed_fn(model), [variables], batch_size=64, branches=method == 'abmt'
  )
  assert summary['source only']['mAP'] == pytest.approx(expected['mAP'], abs=1e-6)
  if method == 'mmt':
    assert np.isfinite(summary['mmt (adapted)']['mAP'])
    # The epoch's record holds every term's share of the gradient (train.make_gradient_shares)
    import json

    with open(workdir / 'metrics.jsonl') as f:
      (epoch,) = [r for r in map(json.loads, f) if r.get('stage') == 'mmt' and 'epoch' in r]
    shares = {k: v for k, v in epoch.items() if k.startswith('grad_share/')}
    assert {'grad_share/tri1', 'grad_share/soft_tri2', 'grad_share/ce1'} <= set(shares)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-4)
  assert (workdir / 'model.msgpack').is_file()


def test_real_task_presets_start_from_the_published_weights():
  from configs import base
  from configs import duke2market
  from configs import market2cuhk_imagenet
  from configs import msmt2market

  c = msmt2market.get_config('mmt')
  assert c.method == 'mmt' and msmt2market.get_config().method == 'abmt'  # ABMT by default
  assert c.model.backbone == 'osnet_x0_25' and c.init.skip_pretrain
  assert c.init.pretrained.endswith('osnet_x0_25_msmt17.pth')
  assert c.data.target_root.endswith('market1501') and (c.data.height, c.data.width) == (256, 128)
  assert (c.train.epochs, c.train.iters, c.data.batch_size) == (3, 100, 32)
  assert c.cluster.num_clusters == 500
  assert msmt2market.get_config('abmt').cluster.lam == 0.0  # no MSMT17 images to mix
  m = market2cuhk_imagenet.get_config('mmt')
  assert m.model.backbone == 'mobilenetv2' and not m.init.skip_pretrain
  # the papers' tasks reproduce the published 4-GPU BatchNorm (16-image groups)
  assert duke2market.get_config('mmt').model.norm_group_size == 16
  assert base.get_config().model.norm_group_size == 0


def test_abmt_from_a_single_branch_model_starts_with_an_identity_extra_block():
  from jaxreid import run

  abmt = models.create_model(arch='abmt', backbone='osnet_x0_25', num_classes=3)
  variables = _trained_looking(abmt)
  images = np.random.default_rng(4).integers(0, 255, (64, 64, 32, 3), dtype=np.uint8)
  warm = run.warm_start_max_branch(abmt, variables, images, seed=0, batches=3, batch=16)
  flat_before = traverse_util.flatten_dict(variables)
  flat_after = traverse_util.flatten_dict(warm)
  for path, value in flat_after.items():
    top = path[1]
    if path[:3] == ('batch_stats', 'max_neck', 'bn'):
      np.testing.assert_array_equal(value, flat_before[path])  # the BN neck behind the fc kept
    elif path[0] == 'batch_stats' and top in ('max_branch', 'max_neck'):
      assert not np.allclose(value, flat_before[path]), path  # re-estimated on the images
    elif path[:3] != ('params', 'max_branch', 'extra'):
      np.testing.assert_array_equal(value, flat_before[path])  # trunk and avg branch untouched
  # The extra block is an identity: the max half of the joint feature is what the copied last
  # stage gives with max pooling alone (a plain OSNet with max pooling and the max-branch weights).
  plain = models.create_model(backbone='osnet_x0_25', pooling='max', num_classes=3)
  max_only = {
      c: {
          'backbone': {**tree['backbone'], **tree['max_branch']},
          'neck': tree['max_neck'],
          'classifier': tree.get('max_classifier', {}),
      }
      for c, tree in warm.items()
  }
  max_only['params']['backbone'].pop('extra')
  max_only['batch_stats']['backbone'].pop('extra')
  max_only['batch_stats'].pop('classifier')
  x = images[:4]
  joint = _jax_features(abmt, warm, x)
  half = joint[:, 512:] / np.linalg.norm(joint[:, 512:], axis=1, keepdims=True)
  np.testing.assert_allclose(_jax_features(plain, max_only, x), half, atol=1e-5)


@pytest.mark.parametrize('backbone', ['resnet', 'osnet_x0_25', 'mobilenetv2'])
@pytest.mark.parametrize('arch', ['resnet', 'abmt'])
def test_benchmark_pytorch_networks_do_the_same_work_as_jaxreids(backbone, arch):
  """experiments/benchmarks/bench_cpu_vs_torch.py compares step times, which means nothing unless
  its PyTorch network is jaxreid's: same trainable parameters (count), same feature widths."""
  torch = pytest.importorskip('torch')
  from experiments.benchmarks import bench_cpu_vs_torch

  net = bench_cpu_vs_torch._torch_net(backbone, arch)
  trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
  model = models.create_model(backbone=backbone, arch=arch, num_classes=512)
  variables = models.abstract_variables(model, 64, 32, batch=2)
  assert trainable == models.count_params(variables['params'])
  net.train()
  out = net(torch.randn(2, 3, 64, 32))
  assert len(out) == (2 if arch == 'abmt' else 1)
  jax_out = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0],
      variables,
      jax.ShapeDtypeStruct((2, 64, 32, 3), jnp.float32),
  )
  keys = ('avg/', 'max/') if arch == 'abmt' else ('',)
  for (f, z), k in zip(out, keys):
    assert tuple(f.shape) == jax_out[f'{k}features'].shape
    assert tuple(z.shape) == jax_out[f'{k}logits'].shape
