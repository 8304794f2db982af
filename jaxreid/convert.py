"""PyTorch state dict -> jaxreid variables: the key maps of the published layouts.

docs/reference.md section 1: the papers start from torchvision's ImageNet ResNet-50 and from the
IBN-Net release `resnet50_ibn_a.pth.tar`; users download those (and the released MMT / ABMT /
torchreid models) themselves and either convert them once into the project's weight format
(`jaxreid-convert`, i.e. `jaxreid.tools.convert`, which writes `jaxreid.checkpoint.save_weights`'
msgpack) or pass them as they are wherever weights are read (`jaxreid.checkpoint.load_weights`
converts on the fly). The file itself is read by `jaxreid.torch_file`, which executes nothing.

`convert_state_dict(state_dict, model, fmt)` maps a flat state dict onto a model's variables;
`fmt='auto'` (default) recognises the layouts (torchvision, IBN-Net, MMT, ABMT, torchreid OSNet,
torchvision MobileNetV2) from the key names (`detect_format`).

Conventions: conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); Linear (out, in) -> (in, out);
BN weight/bias/running_mean/running_var -> scale/bias (params) and mean/var (batch_stats).
A checkpoint classifier with K <= num_classes rows fills rows 0..K-1 (kernel[:, :K]); the other rows
are 0 (a source-model classifier is normally re-initialised from cluster centroids anyway). The
neck's bias is frozen at 0 in the reference (jaxreid's neck has none): a non-zero one is an error.
`num_batches_tracked` and torchvision's ImageNet `fc.*` are ignored.
"""

from __future__ import annotations

import re
from typing import Any
from typing import Mapping

from flax import traverse_util
import numpy as np

from jaxreid import mobilenetv2
from jaxreid import models
from jaxreid import numpy_init
from jaxreid import osnet

FORMATS = (
    'auto',
    'torchvision',
    'ibn',
    'mmt',
    'abmt',
    'torchreid',
    'mobilenetv2',
    'mobilenetv2_flat',
)
# Which backbone each checkpoint format holds.
FORMAT_BACKBONE = {
    'torchreid': 'osnet',
    'mobilenetv2': 'mobilenetv2',
    'mobilenetv2_flat': 'mobilenetv2',
}


class ConversionError(ValueError):
  """Weights (a PyTorch checkpoint or the project's .msgpack, `jaxreid.checkpoint`) that cannot
  be read or whose keys / shapes do not match the requested architecture."""


def extract_state_dict(obj) -> dict[str, np.ndarray]:
  """The flat tensor dict of a checkpoint: `obj['state_dict']` if present, else `obj`; leading
  `module.` prefixes (nn.DataParallel) stripped."""
  if isinstance(obj, Mapping) and 'state_dict' in obj:
    obj = obj['state_dict']
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(
        'checkpoint holds no state dict (expected a dict of tensors or a dict '
        "with a 'state_dict' entry)"
    )
  out = {}
  for k, v in obj.items():
    if not isinstance(v, np.ndarray):
      raise ConversionError(f'state dict entry {k!r} is not a tensor ({type(v).__name__})')
    while k.startswith('module.'):
      k = k[len('module.') :]
    out[k] = v
  return out


def detect_format(state_dict: Mapping[str, Any]) -> str:
  keys = list(state_dict)
  if 'conv2.0.conv1.conv.weight' in state_dict:
    return 'torchreid'
  if 'features.1.conv.0.0.weight' in state_dict:
    return 'mobilenetv2'
  if 'features.1.conv.0.weight' in state_dict and 'features.18.0.weight' in state_dict:
    return 'mobilenetv2_flat'
  if any(k.startswith(('global_branch.', 'max_branch.')) for k in keys):
    return 'abmt'
  if any(k.startswith('base.') for k in keys):
    return 'mmt'
  if any('.bn1.IN.' in k for k in keys):
    return 'ibn'
  if 'conv1.weight' in state_dict:
    return 'torchvision'
  raise ConversionError(
      'cannot recognise the checkpoint layout (no conv1.weight / base.* / '
      'global_branch.* / torchreid OSNet / torchvision MobileNetV2 keys); '
      f'first keys: {keys[:5]}'
  )


def checkpoint_backbone(state_dict: Mapping[str, Any], fmt: str) -> str:
  """The `config.model.backbone` value a checkpoint of format `fmt` needs (OSNet's width is read
  off its first conv)."""
  kind = FORMAT_BACKBONE.get(fmt, 'resnet')
  if kind != 'osnet':
    return kind
  c0 = int(np.shape(state_dict['conv1.conv.weight'])[0])
  for name, channels in osnet.CHANNELS.items():
    if channels[0] == c0:
      return name
  raise ConversionError(
      f'torchreid OSNet with {c0} stem channels matches none of ' f'{sorted(osnet.CHANNELS)}'
  )


def _twin_key(path, fmt: str) -> str | None:
  """torch key of an OSNet / MobileNetV2 variable path (collection, top, *modules, leaf), or
  None for what the checkpoint cannot hold (ABMT's extra block and max-branch head, necks and
  classifiers of ImageNet backbones): those are freshly initialised. ABMT's max branch takes a
  copy of the last stage (as ABMT copies ResNet's layer4)."""
  _, top, *mid, leaf = path
  leaf = _LEAF_NAMES[leaf]
  if top == 'max_branch' and mid[0] == 'extra':
    return None
  if top.endswith('neck') and mid[:1] == ['bn']:
    return None  # the BN neck behind OSNet's fc (head 'bnneck'): torchreid has none
  if fmt == 'torchreid':
    if top in ('backbone', 'avg_branch', 'max_branch', 'neck', 'avg_neck', 'max_neck'):
      return '.'.join([osnet.torch_name(m) for m in mid] + [leaf])
    return 'classifier.weight' if top in ('classifier', 'avg_classifier') else None
  if top in ('backbone', 'avg_branch', 'max_branch'):
    layout = 'flat' if fmt == 'mobilenetv2_flat' else 'modern'
    return f'{mobilenetv2.torch_module(mid, layout)}.{leaf}'
  return None


def _base_layer1_index(state_dict) -> int:
  """Index of layer1 inside the reference's `base` Sequential: 3 for (conv1, bn1, maxpool, ...),
  4 when a ReLU module sits in the stem (IBN variants)."""
  idx = sorted(
      {
          int(m.group(1))
          for k in state_dict
          for m in [re.match(r'base\.(\d+)\.0\.conv1\.weight$', k)]
          if m
      }
  )
  if not idx:
    raise ConversionError('mmt/abmt checkpoint without base.<i>.0.conv1.weight (layer1) keys')
  return idx[0]


_LEAF_NAMES = {
    'scale': 'weight',
    'bias': 'bias',
    'mean': 'running_mean',
    'var': 'running_var',
    'kernel': 'weight',
}


def _torch_module_name(parts) -> str:
  out = []
  for p in parts:
    m = re.fullmatch(r'layer(\d)_(\d+)', p)
    if m:
      out.append(f'layer{m.group(1)}.{m.group(2)}')
    elif p == 'downsample_conv':
      out.append('downsample.0')
    elif p == 'downsample_bn':
      out.append('downsample.1')
    else:
      out.append(p)
  return '.'.join(out)


def _source_key(top: str, rest: str, fmt: str, is_abmt: bool, layer1: int):
  """torch key for jaxreid (top-level module, torchvision-style remainder), or None when the
  format has no such tensor (then it is freshly initialised)."""
  if fmt in ('torchvision', 'ibn'):
    if top in ('backbone', 'avg_branch') or (top == 'max_branch' and rest.startswith('layer4.')):
      return rest
    return None

  # mmt / abmt: `base` Sequential of conv1, bn1, [relu,] maxpool, layer1.. ; then the head.
  def base(r):
    if r.startswith('conv1.'):
      return 'base.0.' + r[len('conv1.') :]
    if r.startswith('bn1.'):
      return 'base.1.' + r[len('bn1.') :]
    m = re.match(r'layer(\d)\.(.*)$', r)
    return f'base.{layer1 + int(m.group(1)) - 1}.{m.group(2)}'

  if fmt == 'mmt':
    if top == 'backbone':
      return base(rest)
    if top in ('avg_branch', 'max_branch'):
      return base(rest) if rest.startswith('layer4.') else None
    # into ABMTNet: the avg branch takes MMT's head, the max branch's head is fresh
    head = {
        'neck': 'feat_bn',
        'avg_neck': 'feat_bn',
        'classifier': 'classifier',
        'avg_classifier': 'classifier',
    }.get(top)
    return None if head is None else f'{head}.{rest}'
  if fmt == 'abmt':
    if not is_abmt:
      raise ConversionError("format 'abmt' needs --arch abmt (ABMTNet)")
    if top == 'backbone':
      return base(rest)
    if top == 'avg_branch':
      return 'global_branch.' + rest[len('layer4.') :]
    if top == 'max_branch':
      if rest.startswith('extra.'):
        return 'max_branch.1.' + rest[len('extra.') :]
      return 'max_branch.0.' + rest[len('layer4.') :]
    return (
        {
            'avg_neck': 'feat_bn',
            'max_neck': 'feat_bn_max',
            'avg_classifier': 'classifier',
            'max_classifier': 'classifier_max',
        }[top]
        + '.'
        + rest
    )
  raise ConversionError(f'unknown format {fmt!r}; choose from {FORMATS}')


def _transform(value: np.ndarray, leaf: str) -> np.ndarray:
  value = np.asarray(value)
  if leaf == 'kernel' and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
  elif leaf == 'kernel' and value.ndim == 2:
    value = value.T  # Linear (out, in) -> (in, out)
  return np.ascontiguousarray(value.astype(np.float32))


def describe_model(model) -> str:
  """'ReIDNet(depth=50, width=64, ibn=False, num_classes=1024)', for messages."""
  if model.backbone != 'resnet':
    return f'{type(model).__name__}(backbone={model.backbone}, num_classes={model.num_classes})'
  return (
      f'{type(model).__name__}(depth={model.depth}, width={model.width}, ibn={model.ibn}, '
      f'num_classes={model.num_classes})'
  )


def _natural(key: str):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', key)]


def _listing(title, items, limit=30):
  if not items:
    return ''
  items = sorted(items, key=_natural)
  shown = '\n    '.join(items[:limit])
  more = f'\n    ... and {len(items) - limit} more' if len(items) > limit else ''
  return f'\n  {title} ({len(items)}):\n    {shown}{more}'


def mismatch_message(what: str, model, missing, unexpected, misshaped) -> str:
  """'<what> does not match <model>:' and the missing / unexpected / mis-shaped keys, listed."""
  return (
      f'{what} does not match {describe_model(model)}:'
      + _listing('missing', missing)
      + _listing('unexpected', unexpected)
      + _listing('mis-shaped', misshaped)
  )


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model,
    fmt: str = 'auto',
    seed: int = 0,
    report: dict | None = None,
) -> dict:
  """Flat torch state dict (numpy values, `module.` already stripped) -> `{'params',
  'batch_stats'}` nested dicts of float32 numpy arrays for `model` (ReIDNet / ABMTNet).

  Raises ConversionError listing missing, unexpected and mis-shaped keys. Tensors the format does
  not have (neck / classifier for ImageNet backbones, ABMT's extra bottleneck) come from
  `numpy_init.init_variables(model, seed)` (model.init's distributions). `report`, if given,
  receives 'format' and the lists 'loaded', 'fresh', 'ignored'.
  """
  state_dict = {
      k[len('module.') :] if k.startswith('module.') else k: v for k, v in state_dict.items()
  }
  if fmt == 'auto':
    fmt = detect_format(state_dict)
  if fmt not in FORMATS:
    raise ConversionError(f'unknown format {fmt!r}; choose from {FORMATS}')
  is_abmt = isinstance(model, models.ABMTNet)
  if fmt == 'abmt' and not is_abmt:
    raise ConversionError(
        "this is an ABMT checkpoint (format 'abmt'): convert it with " '--arch abmt (ABMTNet)'
    )
  twin = fmt in FORMAT_BACKBONE
  kind = FORMAT_BACKBONE.get(fmt, 'resnet')
  if kind != model.backbone.split('_')[0]:
    need = checkpoint_backbone(state_dict, fmt)
    raise ConversionError(
        f'this is a {fmt} checkpoint, which needs backbone {need!r} (e.g. '
        f'--backbone {need}); the model has backbone {model.backbone!r}'
    )
  if twin and kind == 'osnet' and checkpoint_backbone(state_dict, fmt) != model.backbone:
    need = checkpoint_backbone(state_dict, fmt)
    raise ConversionError(
        f'this torchreid checkpoint is {need}, the model is {model.backbone}: '
        f'use backbone {need!r}'
    )
  layer1 = _base_layer1_index(state_dict) if fmt in ('mmt', 'abmt') else 0

  target = traverse_util.flatten_dict(models.abstract_variables(model, 64, 64))
  out, consumed, missing, misshaped, loaded, fresh_paths = {}, set(), [], [], [], []
  neck_prefixes = set()
  for path, spec in sorted(target.items()):
    collection, top, *mid, leaf = path
    if twin:
      key = _twin_key(path, fmt)
    else:
      rest = '.'.join(filter(None, [_torch_module_name(mid), _LEAF_NAMES[leaf]]))
      key = _source_key(top, rest, fmt, is_abmt, layer1)
    is_classifier = top.endswith('classifier')
    if key is not None and key in state_dict:
      consumed.add(key)
      value = _transform(state_dict[key], leaf)
      if top.endswith('neck') and not twin:
        neck_prefixes.add(key.rsplit('.', 1)[0])
      if is_classifier:
        if value.shape[0] != spec.shape[0] or value.shape[1] > spec.shape[1]:
          misshaped.append(
              f'{key}: checkpoint {tuple(state_dict[key].shape)} vs expected '
              f'(<= {spec.shape[1]}, {spec.shape[0]}) (raise --num_classes?)'
          )
          continue
        full = np.zeros(spec.shape, np.float32)
        full[:, : value.shape[1]] = value
        value = full
      elif value.shape != tuple(spec.shape):
        src_shape = tuple(_transform(np.zeros(state_dict[key].shape), leaf).shape)
        misshaped.append(
            f'{key}: checkpoint {tuple(state_dict[key].shape)} (as {src_shape}) vs '
            f'expected {tuple(spec.shape)} ({"/".join(path)})'
        )
        continue
      out[path] = value
      loaded.append(key)
    elif key is None or is_classifier:
      fresh_paths.append(path)
    else:
      missing.append(key)

  ignored = []
  for prefix in sorted(neck_prefixes):  # the neck bias is frozen at 0 in the reference
    bkey = prefix + '.bias'
    if bkey in state_dict:
      consumed.add(bkey)
      if np.max(np.abs(state_dict[bkey])) > 1e-6:
        misshaped.append(
            f'{bkey}: non-zero neck bias (max |b| = '
            f'{float(np.max(np.abs(state_dict[bkey]))):.3g}); the reference freezes '
            'it at 0 and jaxreid necks have no bias'
        )
  unexpected = []
  for k in sorted(state_dict):
    if k in consumed:
      continue
    if (
        k.endswith('num_batches_tracked')
        or (fmt in ('torchvision', 'ibn') and k in ('fc.weight', 'fc.bias'))
        or (twin and k.startswith('classifier.'))
    ):
      # ImageNet heads, and torchreid's classifier bias (jaxreid classifiers have none; a
      # source classifier is replaced by cluster centroids at adaptation anyway)
      ignored.append(k)
    else:
      unexpected.append(f'{k} {tuple(state_dict[k].shape)}')
  if missing or unexpected or misshaped:
    raise ConversionError(
        mismatch_message(f'checkpoint (format {fmt})', model, missing, unexpected, misshaped)
    )
  if fresh_paths:
    out.update(
        traverse_util.flatten_dict(numpy_init.init_variables(model, seed, paths=fresh_paths))
    )
  if report is not None:
    report.update(
        format=fmt, loaded=loaded, fresh=['/'.join(p) for p in fresh_paths], ignored=ignored
    )
  return traverse_util.unflatten_dict(out)
