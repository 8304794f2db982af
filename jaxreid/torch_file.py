"""Reads a PyTorch `torch.save` file into numpy arrays without executing code from it and without
torch installed.

A pickle can name any global and call it; a downloaded checkpoint (torchvision's ImageNet weights,
the IBN-Net release, MMT / ABMT / torchreid models) should only ever hold tensors. `load` reads the
zip format (torch >= 1.6) or the legacy format (older releases such as the IBN-Net one) with a
`pickle.Unpickler` whose `find_class` only resolves the few globals a tensor checkpoint needs, each
mapped to our own numpy rebuilder; any other global (`os.system`, `builtins.eval`, a pickled
`nn.Module`, ...) raises `UnsafeCheckpointError` naming it, before anything is called.

What the tensors mean (key names, layouts) is `jaxreid.convert`'s business.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from typing import Any
import zipfile

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The pickle asks for a global outside the tensor-checkpoint allow-list."""


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
  return np.dtype(ml_dtypes.bfloat16) if name == 'bfloat16' else np.dtype(name)


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


def load(path: str) -> Any:
  """Reads a `torch.save` file (zip or legacy format) into python containers of numpy arrays,
  without torch and without executing code from the file (see the module docstring)."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    obj = _load_zip(path)
  else:
    obj = _load_legacy(path)
  return _materialize(obj)


def is_torch_file(path: str) -> bool:
  """A `torch.save` file: a zip (torch >= 1.6) or a legacy pickle (PROTO opcode 0x80 first;
  the project's msgpack of {params, batch_stats} starts with 0x82, a two-entry map)."""
  if zipfile.is_zipfile(path):
    return True
  with open(path, 'rb') as f:
    return f.read(1) == b'\x80'
