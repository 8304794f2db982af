"""Using a trained model outside training: find its config, build it, load its weights, read images.

Shared by `jaxreid.evaluator` (a data set under the standard protocol), `jaxreid.search` (any
folder of images) and `jaxreid.export`, and by their command lines (`jaxreid.tools`, whose model
flags become `load_model`'s overrides). A model is given either as a work dir
(`<workdir>/model.msgpack`, written by every finished run) or as a `.msgpack` file (a run's, a
pre-training's `<workdir>/pretrain_seed{s}/model.msgpack`, or one made by `jaxreid-convert`; the
format is `jaxreid.checkpoint`'s) or a PyTorch file (converted in memory). Its architecture and
input size come from the `config.json` of the run that wrote it (in the same folder or the parent
folder); without one they are read off the weights' shapes, and explicit overrides win in both
cases. Weights are always checked path by path and shape by shape, so a checkpoint of another
architecture fails with what does not match and the flags that would fit it, instead of loading
garbage or crashing deep inside `apply`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from typing import Any
from typing import Mapping

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from jaxreid import checkpoint
from jaxreid import convert
from jaxreid import features as features_lib
from jaxreid import models
from jaxreid import osnet
from jaxreid import torch_file
from jaxreid import train as train_lib

# Extensions tried when a folder is listed (a single file is tried whatever its name).
IMAGE_EXTENSIONS = (
    '.jpg',
    '.jpeg',
    '.png',
    '.bmp',
    '.gif',
    '.tif',
    '.tiff',
    '.webp',
    '.ppm',
    '.pgm',
)
# Without config.json or flags: the papers' input size.
DEFAULT_HEIGHT, DEFAULT_WIDTH = 256, 128
# Shape-determining fields (the rest -- stem ReLU, last stride, pooling -- keep model defaults).
ARCH_KEYS = ('arch', 'backbone', 'depth', 'width', 'ibn')
_MARKET_NAME = re.compile(r'^(-?\d+)_c(\d+)')


class InferenceError(ValueError):
  """A problem with what the user passed (paths, weights, images); the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Finding the files


def resolve_model_path(path: str) -> tuple[str, str | None]:
  """`--model` (a work dir or a .msgpack) -> (weights file, config.json or None)."""
  if not path:
    raise InferenceError('no model given: pass --model=<work dir or model.msgpack>')
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise InferenceError(
        f'model {path} does not exist: pass a work dir of a finished run or a ' '.msgpack file'
    )
  if os.path.isdir(path):
    weights = os.path.join(path, 'model.msgpack')
    if not os.path.isfile(weights):
      found = sorted(
          os.path.relpath(os.path.join(d, f), path)
          for d, _, files in os.walk(path)
          for f in files
          if f.endswith('.msgpack')
      )
      hint = (
          f'; weights found below it: {", ".join(found[:5])} (pass one as --model)'
          if found
          else '; a finished run writes it (an unfinished one has only checkpoints)'
      )
      raise InferenceError(f'{path} has no model.msgpack{hint}')
    return weights, find_config(weights)
  if torch_file.is_torch_file(path):  # converted on the fly (load_model); no jaxreid config
    return path, None
  return path, find_config(path)


def find_config(weights_path: str) -> str | None:
  """config.json next to the weights, else in the parent folder (pretrain_seed{s}/ lies inside
  the run's work dir)."""
  folder = os.path.dirname(os.path.abspath(weights_path))
  for cand in (folder, os.path.dirname(folder)):
    p = os.path.join(cand, 'config.json')
    if os.path.isfile(p):
      return p
  return None


# ----------------------------------------------------------------------------------------------
# The model


def guess_architecture(variables: Mapping) -> dict | None:
  """{arch, depth, width, ibn} read off a variable tree's names and shapes (None if unknown).

  Used when there is no config.json, and to tell the user which flags fit a checkpoint that does
  not match the requested architecture.
  """
  try:
    params = variables['params']
    arch = 'abmt' if 'avg_branch' in params else 'resnet'
    trunk = params['backbone']
    if 'features_0' in trunk:
      return dict(arch=arch, backbone='mobilenetv2')
    if 'conv2_0' in trunk:
      c0 = int(np.shape(trunk['conv1']['conv']['kernel'])[-1])
      backbone = next(n for n, c in osnet.CHANNELS.items() if c[0] == c0)
      neck = params['avg_neck' if arch == 'abmt' else 'neck']
      return dict(arch=arch, backbone=backbone, head='bnneck' if 'bn' in neck else 'fc_pre_bn')
    width = int(np.shape(trunk['conv1']['kernel'])[-1])
    counts = [0, 0, 0, 0]
    blocks = dict(trunk)
    if arch == 'abmt':
      blocks.update(params['avg_branch'])
    for name in blocks:
      m = re.fullmatch(r'layer(\d)_(\d+)', name)
      if m:
        s = int(m.group(1)) - 1
        counts[s] = max(counts[s], int(m.group(2)) + 1)
    block = 'bottleneck' if 'conv3' in trunk['layer1_0'] else 'basic'
    depth = next(
        d for d, (b, c) in models.RESNET_SPECS.items() if b == block and tuple(c) == tuple(counts)
    )
    ibn = 'IN' in trunk['layer1_0']['bn1']
  except (KeyError, TypeError, StopIteration, IndexError):
    return None
  return dict(arch=arch, backbone='resnet', depth=depth, width=width, ibn=bool(ibn))


def _flags_text(arch: Mapping) -> str:
  if arch.get('backbone', 'resnet') != 'resnet':
    return f'--arch={arch["arch"]} --backbone={arch["backbone"]}'
  return f'--arch={arch["arch"]} --depth={arch["depth"]} --width={arch["width"]}' + (
      ' --ibn' if arch.get('ibn') else ''
  )


def _num_classes(variables: Mapping) -> int:
  """Classifier width of the checkpoint (fixed per run; not used by eval features)."""
  for key, sub in variables['params'].items():
    if key.endswith('classifier') and 'kernel' in sub:
      return int(np.shape(sub['kernel'])[-1])
  return 1


@dataclasses.dataclass
class LoadedModel:
  """A model ready for feature extraction (eval mode, L2-normalised features)."""

  model: Any
  variables: dict
  height: int
  width: int
  weights_path: str
  config_path: str | None
  config: dict
  source: str  # where the architecture came from, for messages
  _embed: Any = None
  _device_variables: Any = None

  @property
  def feature_dim(self) -> int:
    return models.embedding_dim(self.model)

  def describe(self) -> str:
    m = self.model
    abmt = isinstance(m, models.ABMTNet)
    if m.backbone == 'resnet':
      net = f'{"ABMT" if abmt else "ResNet"}{"-IBN-a" if m.ibn else ""}-{m.depth} (width {m.width})'
    else:
      net = f'{"ABMT " if abmt else ""}{m.backbone}'
    return (
        f'{net}, input {self.height}x{self.width}, {self.feature_dim}-d features; '
        f'architecture from {self.source}'
    )

  def extract(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 (N, H, W, 3) at the model's input size -> unit features (N, D) float32.

    Jitted with one fixed batch shape (the last batch padded), sharded over all devices when
    there are several; runs on the accelerator when there is one.
    """
    if images.shape[1:3] != (self.height, self.width):
      raise ValueError(
          f'images are {images.shape[1]}x{images.shape[2]}, the model expects '
          f'{self.height}x{self.width}: decode them at that size'
      )
    if self._embed is None:
      mesh, where = None, None
      if jax.device_count() > 1:  # the trainer's 1-D mesh: weights replicated, batch sharded
        mesh = train_lib.make_mesh()
        where = NamedSharding(mesh, PartitionSpec())
      self._embed = features_lib.make_embed_fn(self.model, mesh)
      self._device_variables = jax.device_put(self.variables, where)
    return features_lib.extract_features(self._embed, [self._device_variables], images, batch_size)


def load_model(path: str, overrides: Mapping[str, Any] | None = None) -> LoadedModel:
  """Builds the model for `path` (work dir or .msgpack) and loads its weights, shape-checked.

  overrides: any of arch, depth, width, ibn (architecture) and height, img_width (input size);
  None values are ignored. They replace the config.json values, or, without a config.json, the
  architecture read off the weights.
  """
  overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
  unknown = set(overrides) - set(ARCH_KEYS) - {'height', 'img_width'}
  if unknown:
    raise ValueError(f'load_model: unknown overrides {sorted(unknown)}')
  weights_path, config_path = resolve_model_path(path)
  if torch_file.is_torch_file(weights_path):
    return _load_torch_model(weights_path, overrides)
  try:
    raw = checkpoint.read_weights(weights_path)
  except (convert.ConversionError, OSError) as e:
    raise InferenceError(
        f'cannot read weights: {e}. Expected a jaxreid model.msgpack (written by a '
        'finished run, by pre-training, or by `jaxreid-convert`)'
    ) from None
  guess = guess_architecture(raw)

  config: dict = {}
  if config_path is not None:
    try:
      with open(config_path) as f:
        config = json.load(f)
    except (OSError, ValueError) as e:
      raise InferenceError(
          f'cannot read {config_path}: {e}. Fix or remove it and pass the '
          'architecture as flags (--arch, --depth, --width, --height, '
          '--img_width)'
      ) from None
  if not isinstance(config, dict):
    raise InferenceError(
        f'{config_path} is not a jaxreid config (expected a JSON object with '
        '"model" and "data" sections)'
    )
  model_cfg = dict(config.get('model') or {})
  why = 'no config.json found' if config_path is None else f'{config_path} has no model section'
  if model_cfg:
    source = config_path
    if 'head' not in model_cfg and guess is not None and 'head' in guess:
      model_cfg['head'] = guess['head']  # a work dir written before the head field existed
  elif guess is not None:
    model_cfg.update(guess)
    source = f"the weights' shapes ({why})"
  else:
    source = f'defaults ({why})'
  arch_overrides = {k: v for k, v in overrides.items() if k in ARCH_KEYS}
  if arch_overrides:
    model_cfg.update(arch_overrides)
    source += ' + flags ' + ' '.join(f'--{k}={v}' for k, v in arch_overrides.items())
  model_cfg = {k: v for k, v in model_cfg.items() if k in models.MODEL_FIELDS or k == 'arch'}
  model_cfg['num_classes'] = _num_classes(raw)
  try:
    model = models.create_model(model_cfg)
  except (ValueError, TypeError) as e:
    raise InferenceError(f'cannot build the model from {source}: {e}') from None

  data_cfg = config.get('data') or {}
  height = int(overrides.get('height') or data_cfg.get('height') or DEFAULT_HEIGHT)
  width = int(overrides.get('img_width') or data_cfg.get('width') or DEFAULT_WIDTH)
  if height < 16 or width < 16:
    raise InferenceError(f'input size {height}x{width} is too small (at least 16x16)')

  try:
    checkpoint.check_weights(raw, model, weights_path)
  except convert.ConversionError as e:
    hint = ''
    if guess is not None:
      hint = f' The weights look like {_flags_text(guess)}.'
    where = (
        f'{config_path} may belong to another run: use the work dir that wrote the weights, '
        'or override it with'
        if config_path
        else 'pass'
    )
    raise InferenceError(
        f'the weights {weights_path} do not fit the network built from {source}.{hint} To fix: '
        f'{where} flags naming the trained network (--arch, --depth, --width, --ibn).\n'
        f'Details: {e}'
    ) from None
  return LoadedModel(
      model=model,
      variables=raw,
      height=height,
      width=width,
      weights_path=weights_path,
      config_path=config_path,
      config=config,
      source=source,
  )


def _load_torch_model(path: str, overrides: Mapping[str, Any]) -> LoadedModel:
  """A PyTorch file (torchvision, torchreid, MMT, ABMT), converted in memory, nothing executed:
  the architecture comes from its keys (torchreid OSNet width from its stem), flags override."""
  try:
    sd = convert.extract_state_dict(torch_file.load(path))
    fmt = convert.detect_format(sd)
    model_cfg = dict(
        arch='abmt' if fmt == 'abmt' else 'resnet', backbone=convert.checkpoint_backbone(sd, fmt)
    )
    if model_cfg['backbone'] == 'mobilenetv2':
      model_cfg['last_stride'] = 2  # torchvision's network as it is
    model_cfg.update({k: v for k, v in overrides.items() if k in ARCH_KEYS})
    sd = {k: v for k, v in sd.items() if not k.split('.')[0].startswith('classifier')}
    model = models.create_model(model_cfg, num_classes=1)
    variables = convert.convert_state_dict(sd, model, fmt)
  except (convert.ConversionError, pickle.UnpicklingError, ValueError) as e:
    raise InferenceError(f'cannot use the PyTorch file {path}: {e}') from None
  height = int(overrides.get('height') or DEFAULT_HEIGHT)
  width = int(overrides.get('img_width') or DEFAULT_WIDTH)
  return LoadedModel(
      model=model,
      variables=variables,
      height=height,
      width=width,
      weights_path=path,
      config_path=None,
      config={},
      source=f"the PyTorch file's keys (format {fmt}, converted in memory)",
  )


# ----------------------------------------------------------------------------------------------
# Images


@dataclasses.dataclass
class ImageSet:
  """Images that could be read (in order), and those that could not, with the reason."""

  paths: list[str]
  images: np.ndarray  # (N, H, W, 3) uint8
  skipped: list[tuple[str, str]]

  def __len__(self) -> int:
    return len(self.paths)


def list_images(path: str, what: str) -> list[str]:
  """A file -> [it]; a folder -> its image files (by extension, sorted, not recursive)."""
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise InferenceError(f'{what}: {path} does not exist')
  if os.path.isfile(path):
    return [path]
  entries = sorted(os.scandir(path), key=lambda e: e.name)
  files = [e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
  if not files:
    subdirs = [e.name for e in entries if e.is_dir()]
    hint = (
        f'; it has sub-folders ({", ".join(subdirs[:5])}): point {what} at the one holding '
        'the images'
        if subdirs
        else ''
    )
    raise InferenceError(
        f'{what}: no images ({", ".join(IMAGE_EXTENSIONS)}) in folder ' f'{path}{hint}'
    )
  return files


def parse_market_name(path: str) -> tuple[int, int] | None:
  """'0002_c1s1_000451_03.jpg' -> (pid 2, camid 0) (0-based camera, as jaxreid's data sets);
  None when the name does not follow the Market-1501 convention."""
  m = _MARKET_NAME.match(os.path.basename(path))
  if m is None or int(m.group(2)) < 1:
    return None
  return int(m.group(1)), int(m.group(2)) - 1


# ----------------------------------------------------------------------------------------------
# Export


def export_features(
    out_dir: str, splits: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any] | None = None
) -> list[str]:
  """Writes `<name>_features.npy` (float32 (N, D), unit rows) and `<name>.json` (paths, pids,
  camids; null where unknown) per split, so other tools need neither jaxreid nor the model.

  splits: name -> {'features', 'paths', 'pids' (or None), 'camids' (or None)}. `extra` is stored
  in every JSON (e.g. the model it came from). Returns the files written.
  """
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, s in splits.items():
    feats = np.asarray(s['features'], np.float32)
    n = len(feats)
    paths = [str(p) for p in s['paths']]
    if len(paths) != n:
      raise ValueError(f'export_features: {name} has {n} features but {len(paths)} paths')

    def ids(v):
      if v is None:
        return [None] * n
      return [None if x is None else int(x) for x in v]

    f_path = os.path.join(out_dir, f'{name}_features.npy')
    np.save(f_path, feats)
    meta = {
        'num_images': n,
        'feature_dim': int(feats.shape[1]) if feats.ndim == 2 else 0,
        'features_file': os.path.basename(f_path),
        'note': 'row i of the features is image i; camids are 0-based; null = unknown',
        **dict(extra or {}),
        'paths': paths,
        'pids': ids(s.get('pids')),
        'camids': ids(s.get('camids')),
    }
    j_path = os.path.join(out_dir, f'{name}.json')
    with open(j_path, 'w') as f:
      json.dump(meta, f, indent=1)
    written += [f_path, j_path]
  return written
