"""PyTorch checkpoint -> jaxreid variables, loaded without executing anything from the file.

docs/reference.md section 1: the papers start from torchvision's ImageNet ResNet-50 and from the
IBN-Net release `resnet50_ibn_a.pth.tar`; users download those (and the released MMT / ABMT /
torchreid models) themselves and either convert them once into the project's weight format
(`jaxreid-convert`, i.e. `jaxreid.tools.convert`, which writes `jaxreid.checkpoint.save_weights`'
msgpack) or pass them as they are wherever weights are read (`jaxreid.checkpoint.load_weights`
converts on the fly).

`convert_state_dict(state_dict, model, fmt)` maps a flat state dict onto a model's variables;
`--format auto` / `fmt='auto'` (default) recognises the layouts (torchvision, IBN-Net, MMT, ABMT,
torchreid OSNet, torchvision MobileNetV2) from the key names (`detect_format`).

Why one long module: the safe unpickler (an allow-list of the few globals a torch file needs,
both the zip and the legacy format) and the key mappings of six published layouts are one
concern, reading someone else's file, and are tested together against real files.

Safety: `load_torch_checkpoint` never imports torch and never calls `torch.load`. It reads the
zip format (torch >= 1.6) or the legacy format (older releases such as the IBN-Net one) with a
`pickle.Unpickler` whose `find_class` only resolves the few globals a tensor checkpoint needs, each
mapped to our own numpy rebuilder; any other global (`os.system`, `builtins.eval`, a pickled
`nn.Module`, ...) raises `UnsafeCheckpointError` naming it, before anything is called.

Conventions: conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); Linear (out, in) -> (in, out);
BN weight/bias/running_mean/running_var -> scale/bias (params) and mean/var (batch_stats).
A checkpoint classifier with K <= num_classes rows fills rows 0..K-1 (kernel[:, :K]); the other rows
are 0 (a source-model classifier is normally re-initialised from cluster centroids anyway). The
neck's bias is frozen at 0 in the reference (jaxreid's neck has none): a non-zero one is an error.
`num_batches_tracked` and torchvision's ImageNet `fc.*` are ignored.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import sys
from typing import Any
from typing import Mapping
import zipfile

import numpy as np

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


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The pickle asks for a global outside the tensor-checkpoint allow-list."""


class ConversionError(ValueError):
  """Weights (a PyTorch checkpoint or the project's .msgpack, `jaxreid.checkpoint`) that cannot
  be read or whose keys / shapes do not match the requested architecture."""


# ----------------------------------------------------------------------------------------------
# Safe reading of torch checkpoints (no torch needed)


def _bf16():
  import ml_dtypes  # ships with jax

  return np.dtype(ml_dtypes.bfloat16)


_STORAGE_DTYPES = {
    'FloatStorage': 'float32',
    'DoubleStorage': 'float64',
    'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16',
    'LongStorage': 'int64',
    'IntStorage': 'int32',
    'ShortStorage': 'int16',
    'CharStorage': 'int8',
    'ByteStorage': 'uint8',
    'BoolStorage': 'bool',
    'UntypedStorage': 'uint8',
}
_TORCH_DTYPES = {
    'float32': 'float32',
    'float': 'float32',
    'float64': 'float64',
    'double': 'float64',
    'float16': 'float16',
    'half': 'float16',
    'bfloat16': 'bfloat16',
    'int64': 'int64',
    'long': 'int64',
    'int32': 'int32',
    'int': 'int32',
    'int16': 'int16',
    'short': 'int16',
    'int8': 'int8',
    'uint8': 'uint8',
    'bool': 'bool',
}


def _np_dtype(name: str) -> np.dtype:
  return _bf16() if name == 'bfloat16' else np.dtype(name)


class _StorageType:
  """Stands for `torch.<X>Storage` / a `torch.<dtype>`; only carries a numpy dtype."""

  def __init__(self, name: str, dtype: str):
    self.name, self.dtype = name, _np_dtype(dtype)

  def __repr__(self):
    return f'torch.{self.name}'


class _Storage:
  """A flat numpy buffer; legacy-format storages are filled after the main pickle."""

  def __init__(self, dtype: np.dtype, numel: int, data: np.ndarray | None = None):
    self.dtype, self.numel, self.data = dtype, numel, data


class _StorageView:
  """Legacy-format view into a root storage (torch < 1.0 `view_metadata`)."""

  def __init__(self, root: _Storage, offset: int, size: int):
    self.root, self.offset, self.size = root, offset, size


class _LazyTensor:
  """A tensor to materialise once all storages are read (legacy format stores them last)."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    self.storage, self.offset = storage, offset
    self.size, self.stride, self.dtype = tuple(size), tuple(stride), dtype

  def materialize(self) -> np.ndarray:
    st = self.storage
    base_offset = 0
    if isinstance(st, _StorageView):
      base_offset, st = st.offset, st.root
    if not isinstance(st, _Storage):
      raise pickle.UnpicklingError(f'tensor rebuilt from a non-storage {type(st).__name__}')
    ints = (self.offset, base_offset) + self.size + self.stride
    if not all(isinstance(v, (int, np.integer)) and v >= 0 for v in ints) or len(self.size) != len(
        self.stride
    ):
      raise pickle.UnpicklingError(
          f'bad tensor geometry: offset {self.offset}, size {self.size}, ' f'stride {self.stride}'
      )
    if st.data is None:
      raise pickle.UnpicklingError('checkpoint storage was never read (truncated file?)')
    flat = st.data
    if self.dtype is not None and self.dtype != flat.dtype:  # _rebuild_tensor_v3 on raw bytes
      flat = flat.view(np.uint8).view(self.dtype)
    numel = int(np.prod(self.size, dtype=np.int64))
    if numel == 0:
      return np.zeros(self.size, flat.dtype)
    flat = flat[base_offset + self.offset :]
    strides = tuple(s * flat.dtype.itemsize for s in self.stride)
    extent = 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if extent > flat.size:
      raise pickle.UnpicklingError(
          f'tensor of size {self.size} stride {self.stride} exceeds '
          f'its storage ({flat.size} elements)'
      )
    return np.lib.stride_tricks.as_strided(flat, self.size, strides).copy()


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
  dt = dtype.dtype if isinstance(dtype, _StorageType) else None
  return _LazyTensor(storage, storage_offset, size, stride, dt)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  if not isinstance(data, _LazyTensor):
    raise pickle.UnpicklingError('parameter without tensor data')
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  if func not in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
    raise UnsafeCheckpointError('refusing _rebuild_from_type_v2 with a non-tensor rebuild function')
  return func(*args)


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise UnsafeCheckpointError('refusing numpy scalar of object dtype')
  return np.frombuffer(data, dtype)[0]


def _numpy_dtype(name, align=False, copy=False):
  dt = np.dtype(name)
  if dt.hasobject:
    raise UnsafeCheckpointError(f'refusing numpy object dtype {name!r}')
  return dt


def _codecs_encode(obj, encoding='utf-8'):
  # protocol-2 pickles store `bytes` as _codecs.encode(str, 'latin1')
  if not isinstance(obj, str) or encoding not in ('latin1', 'latin-1'):
    raise UnsafeCheckpointError('refusing _codecs.encode with non-latin1 arguments')
  return obj.encode('latin1')


class _TypeMarker:

  def __init__(self, name):
    self.name = name


_ALLOWED_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Tensor'): _TypeMarker('torch.Tensor'),
    ('torch.nn.parameter', 'Parameter'): _TypeMarker('torch.nn.parameter.Parameter'),
    ('torch', 'Size'): tuple,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy', 'dtype'): _numpy_dtype,
    ('_codecs', 'encode'): _codecs_encode,
}
_ALLOWED_GLOBALS.update({('torch', k): _StorageType(k, v) for k, v in _STORAGE_DTYPES.items()})
_ALLOWED_GLOBALS.update({('torch', k): _StorageType(k, v) for k, v in _TORCH_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
  """`find_class` resolves only `_ALLOWED_GLOBALS` (our own rebuilders); storages come from
  `persistent_load`. Extension-registry opcodes also go through `find_class`."""

  def __init__(self, file, persistent_load_fn, source: str):
    super().__init__(file)
    self._persistent_load_fn = persistent_load_fn
    self._source = source

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f'{self._source}: refusing to load global {module}.{name}: only plain tensor '
          'checkpoints (dicts of tensors / numbers / strings) can be converted; nothing from the '
          'file was executed'
      ) from None

  def persistent_load(self, pid):
    if self._persistent_load_fn is None:
      raise UnsafeCheckpointError(f'{self._source}: unexpected persistent id {pid!r}')
    return self._persistent_load_fn(pid)


def _storage_dtype(storage_type, source) -> np.dtype:
  if not isinstance(storage_type, _StorageType):
    raise UnsafeCheckpointError(f'{source}: bad storage type {storage_type!r}')
  return storage_type.dtype


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pkls) != 1:
      raise pickle.UnpicklingError(f'{path}: not a torch zip checkpoint (no <name>/data.pkl)')
    prefix = pkls[0][: -len('data.pkl')]
    big_endian = False
    if prefix + 'byteorder' in names:
      big_endian = zf.read(prefix + 'byteorder').decode().strip() == 'big'
    storages = {}

    def persistent_load(pid):
      if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage':
        raise UnsafeCheckpointError(f'{path}: unexpected persistent id {pid!r}')
      _, storage_type, key, _location, numel = pid[:5]
      if key not in storages:
        dtype = _storage_dtype(storage_type, path)
        raw = zf.read(f'{prefix}data/{key}')
        arr = np.frombuffer(raw, dtype.newbyteorder('>') if big_endian else dtype)
        if big_endian:
          arr = arr.astype(dtype)
        storages[key] = _Storage(dtype, arr.size, arr)
      return storages[key]

    up = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), persistent_load, path)
    return up.load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as f:

    def plain():
      return _RestrictedUnpickler(f, None, path).load()

    try:
      magic = plain()
    except UnsafeCheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - anything else means "not this format"
      raise pickle.UnpicklingError(
          f'{path}: neither a torch zip nor a legacy torch checkpoint ' f'({e})'
      ) from None
    if magic != _LEGACY_MAGIC:
      raise pickle.UnpicklingError(f'{path}: not a torch checkpoint (bad magic number)')
    plain()  # protocol version
    sys_info = plain()
    if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
      raise pickle.UnpicklingError(f'{path}: big-endian legacy checkpoints are not supported')
    storages = {}

    def persistent_load(pid):
      if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != 'storage':
        raise UnsafeCheckpointError(f'{path}: unexpected persistent id {pid!r}')
      _, storage_type, root_key, _location, numel, view_metadata = pid
      if root_key not in storages:
        storages[root_key] = _Storage(_storage_dtype(storage_type, path), int(numel))
      root = storages[root_key]
      if view_metadata is not None:
        _view_key, offset, size = view_metadata
        return _StorageView(root, int(offset), int(size))
      return root

    result = _RestrictedUnpickler(f, persistent_load, path).load()
    keys = plain()
    file_size = os.fstat(f.fileno()).st_size
    for key in keys:
      if key not in storages:
        raise pickle.UnpicklingError(f'{path}: storage {key!r} is listed but never used')
      st = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise pickle.UnpicklingError(f'{path}: truncated storage {key}')
      numel = int(np.frombuffer(header, '<i8')[0])
      # The declared size must fit in what is left of the file: never allocate on its word.
      if numel < 0 or numel * st.dtype.itemsize > file_size - f.tell():
        raise pickle.UnpicklingError(
            f'{path}: storage {key} declares {numel} elements, more '
            'than the file holds (truncated or corrupt file)'
        )
      raw = f.read(numel * st.dtype.itemsize)
      if len(raw) != numel * st.dtype.itemsize:
        raise pickle.UnpicklingError(f'{path}: truncated storage {key}')
      st.data = np.frombuffer(raw, st.dtype.newbyteorder('<')).astype(st.dtype)
      st.numel = numel
  return result


def _materialize(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialize(v)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def load_torch_checkpoint(path: str) -> Any:
  """Reads a `torch.save` file (zip or legacy format) into python containers of numpy arrays,
  without torch and without executing code from the file (see module docstring)."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    obj = _load_zip(path)
  else:
    obj = _load_legacy(path)
  return _materialize(obj)


# ----------------------------------------------------------------------------------------------
# State dict -> jaxreid variables


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
  from jaxreid import osnet

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
  from jaxreid import mobilenetv2
  from jaxreid import osnet

  _, top, *mid, leaf = path
  leaf = _LEAF_NAMES[leaf]
  if top == 'max_branch' and mid[0] == 'extra':
    return None
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
  from flax import traverse_util

  from jaxreid import models
  from jaxreid import numpy_init

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


def convert_checkpoint(
    path: str, model, fmt: str = 'auto', seed: int = 0, report: dict | None = None
) -> dict:
  """`load_torch_checkpoint` + `extract_state_dict` + `convert_state_dict`."""
  sd = extract_state_dict(load_torch_checkpoint(path))
  return convert_state_dict(sd, model, fmt, seed=seed, report=report)


def is_torch_file(path: str) -> bool:
  """A `torch.save` file: a zip (torch >= 1.6) or a legacy pickle (PROTO opcode 0x80 first;
  the project's msgpack of {params, batch_stats} starts with 0x82, a two-entry map)."""
  if zipfile.is_zipfile(path):
    return True
  with open(path, 'rb') as f:
    return f.read(1) == b'\x80'


if __name__ == '__main__':  # `python -m jaxreid.convert`: the command line is jaxreid.tools.convert
  from jaxreid.tools import convert as _tool

  sys.exit(_tool.main())
