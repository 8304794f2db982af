"""A jaxreid model back in PyTorch, for the tools that use torchreid / torchvision networks
(trackers such as StrongSORT / BoxMOT ship a torchreid OSNet).

`torch_state_dict(model, variables, fmt)` gives the state dict and loading notes:
torchreid (OSNet): the state dict of `torchreid.models.osnet_x0_25(num_classes=K)` (the variant
and K are in the notes); `load_state_dict(..., strict=True)` accepts it. The network's eval output
is its fc embedding: with the head 'bnneck' that is the input of jaxreid's BN neck, which torchreid
has no place for, so the file's feature is the embedding the triplet losses trained and jaxreid's
own evaluation reads the neck's per-dimension standardisation of it (the notes say so; evaluating
the file, e.g. `jaxreid-evaluate --model=model.pth`, scores the file's feature); with 'fc_pre_bn'
it is jaxreid's feature before L2 normalisation. The classifier holds the cluster centroids, the
neck folded into its weight and bias, so its logits are jaxreid's. torchvision (MobileNetV2): the state dict of
`torchvision.models.mobilenet_v2(num_classes=1280)` whose classifier Linear is jaxreid's BN neck
folded into a diagonal matrix and a bias, so `model(x)` is jaxreid's feature before L2
normalisation. A model trained with last stride 1 needs `model.features[14].conv[1][0].stride =
(1, 1)` after loading (in the notes). An ABMT network exports one branch (`single_branch(...,
'avg')`: a plain OSNet / MobileNetV2; the max branch has an extra block no PyTorch twin has).
`save_torch` writes the file (needs PyTorch installed). The command line is `jaxreid-export`
(`jaxreid.tools.export`).
"""

from __future__ import annotations

import os

from flax import traverse_util
import numpy as np

from jaxreid import convert
from jaxreid import models

FORMATS = {'torchreid': 'osnet', 'torchvision': 'mobilenetv2'}


class ExportError(ValueError):
  """The model cannot be written in the requested format; the message says why and what to do."""


def single_branch(variables: dict, branch: str) -> dict:
  """ABMTNet variables -> the ReIDNet variables of one branch: shared trunk + that branch's last
  stage, neck and classifier (only 'avg' has a plain twin: 'max' carries the extra block)."""
  out = {}
  for collection, tree in variables.items():
    tree = dict(tree)
    trunk = {**tree['backbone'], **tree[f'{branch}_branch']}
    sub = {'backbone': trunk, 'neck': tree[f'{branch}_neck']}
    if f'{branch}_classifier' in tree:
      sub['classifier'] = tree[f'{branch}_classifier']
    out[collection] = sub
  return out


def _torch_value(value: np.ndarray, leaf: str) -> np.ndarray:
  """Inverse of `convert._transform`: Flax kernels back to PyTorch's layout."""
  value = np.asarray(value, np.float32)
  if leaf == 'kernel' and value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)  # (kh, kw, I, O) -> (O, I, kh, kw)
  elif leaf == 'kernel' and value.ndim == 2:
    value = value.T
  return np.ascontiguousarray(value)


def torch_state_dict(model, variables: dict, fmt: str) -> tuple[dict, list[str]]:
  """(state dict of numpy arrays in the PyTorch network's key order-independent naming, notes
  for the user) for a ReIDNet with an OSNet (fmt 'torchreid') or MobileNetV2 ('torchvision')
  backbone."""
  if isinstance(model, models.ABMTNet):
    raise ExportError(
        'an ABMT two-branch network has no single PyTorch twin: export its avg '
        'branch with --branch=avg'
    )
  kind = FORMATS.get(fmt)
  if kind is None:
    raise ExportError(f'unknown format {fmt!r}; choose from {sorted(FORMATS)}')
  if model.backbone.split('_')[0] != kind:
    have = [f for f, k in FORMATS.items() if model.backbone.startswith(k)]
    raise ExportError(
        f'format {fmt} is for {kind} networks; this model is a {model.backbone}'
        + (
            f' (use --format={have[0]})'
            if have
            else ': ResNet models have no torchreid / torchvision export here (their '
            'head differs); use the .msgpack with jaxreid-evaluate / jaxreid-search'
        )
    )
  src_fmt = 'torchreid' if kind == 'osnet' else 'mobilenetv2'
  flat = traverse_util.flatten_dict(variables)
  sd, notes = {}, []
  bn_prefixes = set()
  for path, value in flat.items():
    top, leaf = path[1], path[-1]
    if kind == 'mobilenetv2' and top in ('neck', 'classifier'):
      continue  # the neck is folded into the classifier below; the cluster classifier dropped
    if kind == 'osnet' and (top == 'classifier' or (top == 'neck' and path[2] == 'bn')):
      continue  # the BN neck behind the fc, folded with the classifier below
    key = convert._twin_key(path, src_fmt)  # pylint: disable=protected-access
    if key is None:
      raise ExportError(f'{"/".join(path)} has no place in the {fmt} network')
    if leaf in ('mean', 'var'):
      bn_prefixes.add(key.rsplit('.', 1)[0])
    sd[key] = _torch_value(value, leaf)
  for prefix in bn_prefixes:
    sd[f'{prefix}.num_batches_tracked'] = np.zeros((), np.int64)
  if kind == 'osnet':
    kernel = np.asarray(variables['params']['classifier']['kernel'], np.float64)  # (D, K)
    bias = np.zeros(kernel.shape[1])
    if model.head == 'bnneck':
      a, mean = _neck_affine(variables, ('neck', 'bn'))
      kernel, bias = a[:, None] * kernel, -(a * mean) @ kernel  # W^T ((v - mean) * a)
    sd['classifier.weight'] = np.ascontiguousarray(kernel.T, np.float32)
    sd['classifier.bias'] = bias.astype(np.float32)
    k = kernel.shape[1]
    notes.append(
        f'load with torchreid.models.build_model("{model.backbone}", num_classes={k}) '
        f'(or {model.backbone}(num_classes={k})), then load_state_dict(sd, strict=True)'
    )
    notes.append(OSNET_FEATURE_NOTE[model.head])
  else:
    a, mean = _neck_affine(variables, ('neck',))
    sd['classifier.1.weight'] = np.diag(a).astype(np.float32)
    sd['classifier.1.bias'] = (-mean * a).astype(np.float32)
    notes.append(
        f'load with torchvision.models.mobilenet_v2(num_classes={a.size}), then '
        'load_state_dict(sd, strict=True); model(x) is the feature (the BN neck is '
        'the classifier Linear)'
    )
    if model.last_stride == 1:
      notes.append(
          'trained with last stride 1: after loading set '
          'model.features[14].conv[1][0].stride = (1, 1)'
      )
  notes.append(
      'inputs: RGB, ImageNet mean/std normalised, the training size; L2-normalise the '
      'output before comparing features'
  )
  return sd, notes


# What the exported OSNet file's feature is, per head (models.HEADS).
OSNET_FEATURE_NOTE = {
    'bnneck': (
        'feature: model(x) is the 512-d fc embedding (post-BN-ReLU), the one the triplet losses '
        "trained; jaxreid's own evaluation reads the BN neck behind it, which torchreid has no "
        "place for (jaxreid-evaluate --model=<this file> scores the file's feature)"
    ),
    'fc_pre_bn': "feature: model(x) is the 512-d fc embedding, jaxreid's evaluation feature",
}


def _neck_affine(variables: dict, path: tuple) -> tuple[np.ndarray, np.ndarray]:
  """(a, mean) of a bias-free eval-mode BN neck, which computes (x - mean) * a."""
  params, stats = variables['params'], variables['batch_stats']
  for key in path:
    params, stats = params[key], stats[key]
  scale = np.asarray(params['scale'], np.float64)
  mean = np.asarray(stats['mean'], np.float64)
  var = np.asarray(stats['var'], np.float64)
  return scale / np.sqrt(var + 1e-5), mean


def write_torch_file(model, variables: dict, fmt: str, path: str) -> tuple[int, list[str]]:
  """Writes `variables` of `model` as the PyTorch file of format `fmt` (an ABMT network: its avg
  branch, a plain network); returns (number of tensors, loading notes)."""
  if isinstance(model, models.ABMTNet):
    variables = single_branch(variables, 'avg')
    model = models.create_model({f: getattr(model, f) for f in models.MODEL_FIELDS})
  sd, notes = torch_state_dict(model, variables, fmt)
  save_torch(path, sd)
  return len(sd), notes


def save_torch(path: str, state_dict: dict) -> None:
  """`torch.save` of the tensors (written next to the target, then renamed: never half a file)."""
  try:
    import torch  # optional (the convert extra): only writing a PyTorch file needs it
  except ImportError:
    raise ExportError('writing a PyTorch file needs PyTorch: pip install torch') from None
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
  tmp = f'{path}.tmp'
  torch.save(tensors, tmp)
  os.replace(tmp, path)
