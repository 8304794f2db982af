"""PyTorch checkpoint import (docs/reference.md section 1, "Pretrained weights").

The references are built here from torch's own modules (Conv2d, BatchNorm2d, InstanceNorm2d,
MaxPool2d, Linear, BatchNorm1d) with torchvision's / IBN-Net's / MMT's / ABMT's exact key names,
given random weights and non-trivial BN running statistics, saved with `torch.save`, read with
`jaxreid.torch_file`, converted with `jaxreid.convert`, and compared feature for feature in eval
mode and, in train mode, output for output and BN running statistic for running statistic after
one forward pass. Small widths keep it fast on a CPU. Tests needing torch are skipped without it;
the safe loader never needs it.
"""

import copy
import functools
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from jaxreid import checkpoint
from jaxreid import convert
from jaxreid import models
from jaxreid import torch_file
from jaxreid.tools import convert as convert_tool

torch = pytest.importorskip('torch')
nn = torch.nn
F = torch.nn.functional

TOL = 1e-4  # eval mode (running statistics)
# Train mode normalises with the statistics of 4 small images, which amplifies float32 rounding
# differences (~1e-6) by up to 1/std at every BN: outputs agree to 1e-3.
TRAIN_TOL = 1e-3
# Tests compile many small programs on a CPU: XLA's backend optimisation is not worth its
# compile time here (about 2x faster to compile, same float32 arithmetic). Forward passes only:
# XLA:CPU at level 0 has returned a wrong gradient for an ABMT step (tests/test_step_parity.py
# compiles with the default level).
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


# ----------------------------------------------------------------------------------------------
# Reference PyTorch networks (torchvision key names)


class TIBN(nn.Module):

  def __init__(self, planes):
    super().__init__()
    self.half = planes // 2
    self.IN = nn.InstanceNorm2d(self.half, affine=True)
    self.BN = nn.BatchNorm2d(planes - self.half)

  def forward(self, x):
    a, b = torch.split(x, [self.half, x.shape[1] - self.half], 1)
    return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], 1)


class TBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None, ibn=False):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = TIBN(planes) if ibn else nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, ibn=False):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = TIBN(planes) if ibn else nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TResNet(nn.Module):
  """torchvision.models.ResNet layout (and IBN-Net's resnet*_ibn_a), last stride configurable."""

  def __init__(self, depth, width=64, ibn=False, last_stride=1, stem_relu=False):
    super().__init__()
    block = TBasicBlock if depth in (18, 34) else TBottleneck
    layers = models.RESNET_SPECS[depth][1]
    self.stem_relu = stem_relu
    self.inplanes = width
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, width, layers[0], 1, ibn)
    self.layer2 = self._make_layer(block, width * 2, layers[1], 2, ibn)
    self.layer3 = self._make_layer(block, width * 4, layers[2], 2, ibn)
    self.layer4 = self._make_layer(block, width * 8, layers[3], last_stride, False)
    self.fc = nn.Linear(width * 8 * block.expansion, 10)
    self.dim = width * 8 * block.expansion

  def _make_layer(self, block, planes, blocks, stride, ibn):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion),
      )
    layers = [block(self.inplanes, planes, stride, downsample, ibn)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes, ibn=ibn) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def stem(self):
    return [self.conv1, self.bn1] + ([self.relu] if self.stem_relu else []) + [self.maxpool]

  def pooled(self, x):
    x = nn.Sequential(*self.stem(), self.layer1, self.layer2, self.layer3, self.layer4)(x)
    return x.mean((2, 3))


class TMMT(nn.Module):
  """MMT's `ResNet` / `ResNetIBN` (mmt/models/resnet*.py): base + feat_bn + classifier."""

  def __init__(self, r: TResNet, num_classes):
    super().__init__()
    self.base = nn.Sequential(*r.stem(), r.layer1, r.layer2, r.layer3, r.layer4)
    self.feat_bn = nn.BatchNorm1d(r.dim)
    self.feat_bn.bias.requires_grad_(False)
    self.classifier = nn.Linear(r.dim, num_classes, bias=False)

  def forward(self, x):
    f = self.base(x).mean((2, 3))
    bn = self.feat_bn(f)
    if not self.training:
      return F.normalize(bn)
    return f, self.classifier(bn)


class TABMT(nn.Module):
  """ABMT's `resnet50_AB` (abmt/models/resnet_AB*.py)."""

  def __init__(self, r: TResNet, num_classes):
    super().__init__()
    self.base = nn.Sequential(*r.stem(), r.layer1, r.layer2, r.layer3)
    self.global_branch = r.layer4
    self.max_branch = nn.Sequential(copy.deepcopy(r.layer4), TBottleneck(r.dim, r.dim // 4))
    self.feat_bn = nn.BatchNorm1d(r.dim)
    self.feat_bn_max = nn.BatchNorm1d(r.dim)
    self.classifier = nn.Linear(r.dim, num_classes, bias=False)
    self.classifier_max = nn.Linear(r.dim, num_classes, bias=False)

  def forward(self, x):
    x = self.base(x)
    fa = self.global_branch(x).mean((2, 3))
    fm = self.max_branch(x).amax((2, 3))
    ba, bm = self.feat_bn(fa), self.feat_bn_max(fm)
    if not self.training:
      return F.normalize(torch.cat([ba, bm], 1))
    return fa, fm, self.classifier(ba), self.classifier_max(bm)


def randomize(module, seed):
  """Random weights everywhere, non-trivial BN statistics; neck biases stay 0 (frozen)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, m in module.named_modules():
      if isinstance(m, nn.Conv2d):
        m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
      elif isinstance(m, nn.Linear):
        m.weight.normal_(0, 0.1, generator=g)
      elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0, 0.1, generator=g)
        if name.startswith('feat_bn'):
          m.bias.zero_()
        if m.running_mean is not None:
          m.running_mean.normal_(0, 0.2, generator=g)
          m.running_var.uniform_(0.5, 2.0, generator=g)
  return module


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def inputs(seed=0, b=4, h=64, w=32):
  return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


def save(obj, path, legacy=False):
  torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
  return str(path)


def tensors(state_dict, prefix=''):
  return {prefix + k: v.numpy() for k, v in state_dict.items()}


@functools.lru_cache(maxsize=None)  # one compilation per model config across tests
def _jitted(model, train):
  if train:
    return _jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  return _jit(lambda v, x: model.apply(v, x))


def jax_eval(model, variables, x):
  return np.asarray(_jitted(model, False)(variables, x))


def jax_train(model, variables, x):
  out, upd = _jitted(model, True)(variables, x)
  return jax.tree_util.tree_map(np.asarray, out), upd['batch_stats']


def assert_tree_close(a, b, tol=TOL):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=tol, atol=tol), a, b)


# ----------------------------------------------------------------------------------------------
# Numerical parity


def test_torchvision_resnet18_eval_and_train_parity(tmp_path):
  ref = randomize(TResNet(18, width=8), 0).eval()
  path = save(ref.state_dict(), tmp_path / 'r18.pth')
  model = models.ReIDNet(depth=18, width=8, num_classes=8)
  report = {}
  v = checkpoint.load_weights(path, model, report=report)
  assert report['format'] == 'torchvision'
  assert set(report['ignored']) >= {'fc.weight', 'fc.bias', 'bn1.num_batches_tracked'}
  assert {k.split('/')[1] for k in report['fresh']} == {'neck', 'classifier'}
  x = inputs()
  with torch.no_grad():
    f = ref.pooled(nchw(x)).numpy()
  expected = f / np.sqrt(1 + 1e-5)  # fresh neck: scale 1, mean 0, var 1
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(jax_eval(model, v, x), expected, atol=TOL)

  # train mode: pre-BN features and every updated running statistic (unbiased variance)
  ref.train()
  with torch.no_grad():
    f_train = ref.pooled(nchw(x)).numpy()
  out, new_stats = jax_train(model, v, x)
  np.testing.assert_allclose(out['features'], f_train, rtol=TRAIN_TOL, atol=TRAIN_TOL)
  expected_stats = convert.convert_state_dict(tensors(ref.state_dict()), model)['batch_stats']
  expected_stats['neck'] = new_stats['neck']  # not in a torchvision checkpoint
  assert_tree_close(jax.tree_util.tree_map(np.asarray, new_stats), expected_stats, TRAIN_TOL)


def test_ibn_release_resnet50_full_width_legacy_format(tmp_path):
  """IBN-Net release layout: legacy (pre-1.6) serialisation, {'state_dict': {'module.'...}},
  stem ReLU; full-width IBN-ResNet-50-a. IN behaves the same in train and eval mode, and the BN
  half is the BatchNorm checked in train mode elsewhere, so eval parity covers it."""
  ref = randomize(TResNet(50, ibn=True, stem_relu=True), 1).eval()
  ckpt = {
      'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()},
      'epoch': 100,
      'arch': 'resnet50_ibn_a',
      'best_prec1': 77.5,
  }
  path = save(ckpt, tmp_path / 'resnet50_ibn_a.pth.tar', legacy=True)
  assert not zipfile.is_zipfile(path)
  model = models.ReIDNet(depth=50, ibn=True, num_classes=4)
  report = {}
  v = checkpoint.load_weights(path, model, report=report)
  assert report['format'] == 'ibn'
  x = inputs(1, b=2)
  with torch.no_grad():
    f = ref.pooled(nchw(x)).numpy()
  expected = f / np.linalg.norm(f, axis=1, keepdims=True)
  np.testing.assert_allclose(jax_eval(model, v, x), expected, atol=TOL)


def test_mmt_checkpoint_parity_and_narrow_classifier(tmp_path):
  ref = randomize(TMMT(TResNet(18, width=8), num_classes=5), 2).eval()
  ckpt = {
      'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()},
      'epoch': 3,
      'best_mAP': np.float64(0.625),
  }  # numpy scalar, as MMT saves it
  path = save(ckpt, tmp_path / 'model_best.pth.tar')
  loaded = torch_file.load(path)
  assert loaded['epoch'] == 3 and loaded['best_mAP'] == 0.625
  model = models.ReIDNet(depth=18, width=8, num_classes=8)
  report = {}
  v = checkpoint.load_weights(path, model, report=report)
  assert report['format'] == 'mmt' and not report['fresh']
  kernel = v['params']['classifier']['kernel']
  np.testing.assert_array_equal(kernel[:, :5], ref.classifier.weight.detach().numpy().T)
  assert np.all(kernel[:, 5:] == 0)
  x = inputs(2)
  with torch.no_grad():
    expected = ref(nchw(x)).numpy()
  np.testing.assert_allclose(jax_eval(model, v, x), expected, atol=TOL)
  ref.train()
  with torch.no_grad():
    f, z = (t.numpy() for t in ref(nchw(x)))
  out, new_stats = jax_train(model, v, x)
  np.testing.assert_allclose(out['features'], f, rtol=TRAIN_TOL, atol=TRAIN_TOL)
  np.testing.assert_allclose(out['logits'][:, :5], z, rtol=TRAIN_TOL, atol=TRAIN_TOL)
  assert np.all(out['logits'][:, 5:] == 0)
  expected_stats = convert.convert_state_dict(tensors(ref.state_dict()), model)['batch_stats']
  assert_tree_close(jax.tree_util.tree_map(np.asarray, new_stats), expected_stats, TRAIN_TOL)


def test_abmt_checkpoint_parity(tmp_path):
  """ABMT (ResNet-18 width 8 for speed; the bottleneck mapping is checked on IBN-50 above, the key layout does not depend on depth): eval parity of the 2D feature, train
  parity of all four outputs and every BN statistic, every head tensor in place."""
  ref = randomize(TABMT(TResNet(18, width=8), num_classes=6), 3).eval()
  path = save(
      {'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}, 'epoch': 40},
      tmp_path / 'abmt.pth.tar',
  )
  model = models.ABMTNet(depth=18, width=8, num_classes=6)
  v = convert.convert_state_dict(convert.extract_state_dict(torch_file.load(path)), model, 'abmt')
  x = inputs(3)
  with torch.no_grad():
    expected = ref(nchw(x)).numpy()
  np.testing.assert_allclose(jax_eval(model, v, x), expected, atol=TOL)
  p = v['params']
  for name, lin in (('avg_classifier', ref.classifier), ('max_classifier', ref.classifier_max)):
    np.testing.assert_array_equal(p[name]['kernel'], lin.weight.detach().numpy().T)
  np.testing.assert_array_equal(v['batch_stats']['max_neck']['var'], ref.feat_bn_max.running_var)
  extra_conv2 = ref.max_branch[1].conv2.weight.detach().numpy()
  np.testing.assert_array_equal(
      p['max_branch']['extra']['conv2']['kernel'], extra_conv2.transpose(2, 3, 1, 0)
  )
  ref.train()
  with torch.no_grad():
    fa, fm, za, zm = (t.numpy() for t in ref(nchw(x)))
  out, new_stats = jax_train(model, v, x)
  for key, want in (
      ('avg/features', fa),
      ('max/features', fm),
      ('avg/logits', za),
      ('max/logits', zm),
  ):
    np.testing.assert_allclose(out[key], want, rtol=TRAIN_TOL, atol=TRAIN_TOL, err_msg=key)
  expected_stats = convert.convert_state_dict(tensors(ref.state_dict()), model)['batch_stats']
  assert_tree_close(jax.tree_util.tree_map(np.asarray, new_stats), expected_stats, TRAIN_TOL)
  with pytest.raises(convert.ConversionError, match='--arch abmt'):
    checkpoint.load_weights(path, models.ReIDNet(depth=18, width=8))


def test_imagenet_backbone_into_abmt_copies_layer4(tmp_path):
  ref = randomize(TResNet(18, width=8), 4)
  sd = tensors(ref.state_dict())
  model = models.ABMTNet(depth=18, width=8, num_classes=4)
  report = {}
  v = convert.convert_state_dict(sd, model, seed=1, report=report)
  p = v['params']
  np.testing.assert_array_equal(
      p['avg_branch']['layer4_1']['conv2']['kernel'], p['max_branch']['layer4_1']['conv2']['kernel']
  )
  np.testing.assert_array_equal(
      p['avg_branch']['layer4_0']['conv1']['kernel'],
      sd['layer4.0.conv1.weight'].transpose(2, 3, 1, 0),
  )
  fresh_tops = {'/'.join(k.split('/')[1:3]) for k in report['fresh']}
  assert fresh_tops == {
      'max_branch/extra',
      'avg_neck/scale',
      'max_neck/scale',
      'avg_classifier/kernel',
      'max_classifier/kernel',
      'avg_neck/mean',
      'avg_neck/var',
      'max_neck/mean',
      'max_neck/var',
  }
  assert abs(float(p['max_branch']['extra']['bn1']['scale'].std()) - 0.02) < 0.02


# ----------------------------------------------------------------------------------------------
# Errors, safety, storage details, CLI


def test_key_mismatch_message(tmp_path):
  sd = tensors(randomize(TResNet(18, width=8), 6).state_dict())
  sd['foo.weight'] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError) as err:
    convert.convert_state_dict(sd, models.ReIDNet(depth=34, width=8))
  msg = str(err.value)
  assert 'missing' in msg and 'layer1.2.conv1.weight' in msg
  assert 'unexpected' in msg and 'foo.weight' in msg
  with pytest.raises(convert.ConversionError) as err:
    convert.convert_state_dict(sd, models.ReIDNet(depth=18, width=16))
  msg = str(err.value)
  assert 'mis-shaped' in msg and 'conv1.weight: checkpoint (8, 3, 7, 7)' in msg
  ibn_sd = tensors(TResNet(50, width=4, ibn=True).state_dict())
  with pytest.raises(convert.ConversionError, match=r'unexpected[\s\S]*layer1\.0\.bn1\.IN\.weight'):
    convert.convert_state_dict(ibn_sd, models.ReIDNet(depth=50, width=4), fmt='torchvision')
  mmt = TMMT(TResNet(18, width=4), 3)
  with torch.no_grad():
    mmt.feat_bn.bias.fill_(0.5)
  with pytest.raises(convert.ConversionError, match='non-zero neck bias'):
    convert.convert_state_dict(tensors(mmt.state_dict()), models.ReIDNet(depth=18, width=4))
  with pytest.raises(convert.ConversionError, match='raise --num_classes'):
    sd = tensors(TMMT(TResNet(18, width=4), 30).state_dict())
    convert.convert_state_dict(sd, models.ReIDNet(depth=18, width=4, num_classes=20))


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def _zip_checkpoint(path, payload: bytes):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', payload)
    zf.writestr('archive/version', '3\n')
  return str(path)


def test_malicious_pickles_are_refused(tmp_path):
  marker = tmp_path / 'pwned'
  payload = pickle.dumps({'state_dict': {'w': _Evil(marker)}}, protocol=2)
  legacy = tmp_path / 'evil_legacy.pth'
  legacy.write_bytes(payload)  # legacy layout: the payload is the first pickle in the file
  for path in (_zip_checkpoint(tmp_path / 'evil.pth', payload), legacy):
    with pytest.raises(
        torch_file.UnsafeCheckpointError, match=r'refusing to load global (posix|os)\.system'
    ):
      torch_file.load(path)
    assert not marker.exists()
  # a pickled nn.Module (torch.save(model)) is refused too, naming the class
  path = save(nn.Linear(2, 2), tmp_path / 'module.pth')
  with pytest.raises(torch_file.UnsafeCheckpointError, match='torch.nn.modules.linear.Linear'):
    torch_file.load(path)
  eval_payload = pickle.dumps(_EvalReduce(), protocol=2)
  with pytest.raises(torch_file.UnsafeCheckpointError, match=r'(builtins|__builtin__)\.eval'):
    torch_file.load(_zip_checkpoint(tmp_path / 'eval.pth', eval_payload))
  # the CLI reports it as an error and writes nothing
  out = tmp_path / 'out.msgpack'
  assert convert_tool.main(['--model', str(tmp_path / 'evil.pth'), '--out', str(out)]) == 2
  assert not out.exists() and not marker.exists()


class _EvalReduce:

  def __reduce__(self):
    return (eval, ('1 + 1',))


@pytest.mark.parametrize('legacy', [False, True])
def test_storage_dtypes_views_and_parameters(tmp_path, legacy):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  obj = {
      't': base.t(),
      'view': base[1:3, 2:5],
      'half': base.half(),
      'bf16': base.bfloat16(),
      'long': torch.arange(5),
      'p': nn.Parameter(torch.ones(3)),
      'empty': torch.zeros(0, 3),
      'scalar': torch.tensor(2.5),
      'nested': [1, (2.0, 'x')],
  }
  loaded = torch_file.load(save(obj, tmp_path / 'x.pth', legacy=legacy))
  for k in ('t', 'view', 'half', 'long', 'p', 'empty', 'scalar'):
    np.testing.assert_array_equal(loaded[k], obj[k].detach().numpy(), err_msg=k)
    assert loaded[k].dtype == obj[k].detach().numpy().dtype
  np.testing.assert_array_equal(loaded['bf16'].astype(np.float32), base.numpy())
  assert loaded['nested'] == [1, (2.0, 'x')]


def test_loader_works_without_torch(tmp_path):
  path = save({'state_dict': {'module.w': torch.ones(2, 3)}}, tmp_path / 'w.pth')
  code = (
      'import sys; sys.modules["torch"] = None\n'
      'from jaxreid import torch_file\n'
      f'obj = torch_file.load({str(path)!r})\n'
      'assert "jax" not in sys.modules\n'
      'from jaxreid import convert\n'
      'sd = convert.extract_state_dict(obj)\n'
      'assert list(sd) == ["w"] and sd["w"].shape == (2, 3) and sd["w"].sum() == 6\n'
  )
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run([sys.executable, '-c', code], check=True, env=env)


def test_cli_roundtrip(tmp_path):
  ref = randomize(TResNet(18, width=4), 7)
  path = save(
      {'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}},
      tmp_path / 'r18.pth.tar',
  )
  out = tmp_path / 'r18.msgpack'
  rc = convert_tool.main(
      [
          '--model',
          path,
          '--out',
          str(out),
          '--arch',
          'resnet',
          '--depth',
          '18',
          '--width',
          '4',
          '--num_classes',
          '7',
          '--format',
          'torchvision',
      ]
  )
  assert rc == 0
  model = models.ReIDNet(depth=18, width=4, num_classes=7)
  loaded = checkpoint.read_weights(str(out), model)
  assert_tree_close(loaded, checkpoint.load_weights(path, model), tol=0)
  assert open(out, 'rb').read(1) != b'\x80'  # msgpack, not a pickle
  with pytest.raises(convert.ConversionError, match='mis-shaped'):
    checkpoint.read_weights(str(out), models.ReIDNet(depth=18, width=8, num_classes=7))
  assert (
      convert_tool.main(['--model', path, '--out', str(out), '--depth', '34', '--width', '4']) == 2
  )


def test_legacy_file_declaring_huge_storage_is_refused_without_allocating(tmp_path):
  torch = pytest.importorskip('torch')
  values = np.arange(1, 8, dtype=np.float32)
  path = save({'w': torch.from_numpy(values.copy())}, tmp_path / 'x.pth', legacy=True)
  data = bytearray(open(path, 'rb').read())
  at = bytes(data).rindex(values.tobytes())
  assert np.frombuffer(bytes(data[at - 8 : at]), '<i8')[0] == 7  # the storage's declared size
  data[at - 8 : at] = np.array([2**60], '<i8').tobytes()
  open(path, 'wb').write(bytes(data))
  with pytest.raises(pickle.UnpicklingError, match='more than the file holds'):
    torch_file.load(str(path))
