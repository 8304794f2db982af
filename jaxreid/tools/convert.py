"""Convert a PyTorch checkpoint into the project's weight file (.msgpack), executing nothing.

  # torchvision ImageNet ResNet-50 (e.g. resnet50-0676ba61.pth / resnet50-19c8e357.pth)
  jaxreid-convert --model=resnet50-0676ba61.pth --out=r50.msgpack --depth=50
  # IBN-Net release (keys `module.` prefixed, in a dict under 'state_dict')
  jaxreid-convert --model=resnet50_ibn_a.pth.tar --out=r50_ibn_a.msgpack --depth=50 --ibn
  # the same ImageNet weights as the start of an ABMT network (max branch's layer4 copied
  # from layer4, the extra bottleneck, necks and classifiers freshly initialised; --seed)
  jaxreid-convert --model=resnet50-0676ba61.pth --out=abmt_r50.msgpack --arch=abmt --depth=50
  # a released / trained MMT or ABMT model (`module.base.N...`, `module.feat_bn.*`,
  # `module.classifier.*`; ABMT: `global_branch`, `max_branch.0/.1`, `feat_bn(_max)`)
  jaxreid-convert --model=model_best.pth.tar --out=mmt.msgpack --depth=50 [--ibn]
  # a torchreid OSNet (e.g. osnet_x0_25_msmt17.pth): everything read off the file
  jaxreid-convert --model=osnet_x0_25_msmt17.pth --out=weights/osnet_x0_25_msmt17.msgpack
  (or python -m jaxreid.tools.convert ...)

What the file says is read off it: `--format auto` recognises the layouts from the key names,
`--arch auto` picks ABMTNet for an ABMT checkpoint, `--backbone auto` reads a torchreid OSNet's or
a torchvision MobileNetV2's backbone, and the classifier is as wide as the checkpoint's (1024 when
it has none); the flags override. The output is `jaxreid.checkpoint.save_weights`' msgpack of
{params, batch_stats} (its folder is created), which `--config.init.*`, `jaxreid-evaluate` and
`jaxreid-search` read (they also take the PyTorch file itself). Reading is safe: only plain tensor
checkpoints are accepted (`jaxreid.torch_file`). A file that cannot be converted is one line
`error: ...`, exit status 2, and nothing is written.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Sequence
import zipfile

from absl import flags

from jaxreid import checkpoint
from jaxreid import convert
from jaxreid import models
from jaxreid import torch_file
from jaxreid.tools import common

FLAGS = common.flag_values()
flags.DEFINE_string('model', None, 'PyTorch checkpoint (.pth / .pth.tar)', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'output .msgpack ({params, batch_stats})', flag_values=FLAGS)
flags.DEFINE_enum(
    'arch',
    'auto',
    ['auto', 'resnet', 'abmt'],
    'one branch (ReIDNet) or two (ABMTNet); auto: abmt for an ABMT checkpoint, else resnet',
    flag_values=FLAGS,
)
flags.DEFINE_integer('depth', 50, 'ResNet depth', flag_values=FLAGS)
flags.DEFINE_integer('width', 64, 'ResNet width (64 = standard)', flag_values=FLAGS)
flags.DEFINE_bool('ibn', False, 'IBN-ResNet-a', flag_values=FLAGS)
flags.DEFINE_enum(
    'stem_relu',
    'auto',
    ['auto', 'true', 'false'],
    'ReLU after the stem; auto: False for plain ResNet (MMT/ABMT), True for IBN-a',
    flag_values=FLAGS,
)
flags.DEFINE_integer('last_stride', 1, 'stride of the last stage', flag_values=FLAGS)
flags.DEFINE_integer(
    'num_classes',
    None,
    "classifier width (default: the checkpoint classifier's, 1024 without one; a narrower "
    'checkpoint classifier fills its first rows)',
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    'format',
    'auto',
    convert.FORMATS,
    'the checkpoint layout (auto: from its keys)',
    flag_values=FLAGS,
)
flags.DEFINE_integer('seed', 0, 'for freshly initialised parts', flag_values=FLAGS)
flags.DEFINE_enum(
    'backbone',
    'auto',
    ['auto', *models.BACKBONES],
    'the backbone network (auto: read off the checkpoint)',
    flag_values=FLAGS,
)
# former spellings
for _old, _name in (
    ('input', 'model'),
    ('output', 'out'),
    ('stem-relu', 'stem_relu'),
    ('last-stride', 'last_stride'),
    ('num-classes', 'num_classes'),
):
  common.define_alias(FLAGS, _old, _name)
DEFAULT_NUM_CLASSES = 1024  # a checkpoint without a classifier (ImageNet backbones)


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxreid-convert`; argv without the program name (None: the process's). Exit status."""
  return common.run(_convert, FLAGS, argv, doc=__doc__, required=('model', 'out'))


def checkpoint_num_classes(state_dict) -> int | None:
  """Rows of the checkpoint's classifier (MMT / ABMT / torchreid `classifier.weight`), if any."""
  weight = state_dict.get('classifier.weight')
  return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def _convert() -> int:
  if not os.path.isfile(FLAGS.model):
    raise common.UsageError(f'--model={FLAGS.model}: no such file')
  if not torch_file.is_torch_file(FLAGS.model):
    with open(FLAGS.model, 'rb') as f:
      msgpack = f.read(1) == b'\x82'  # save_weights' two-entry map
    raise common.UsageError(
        f'--model={FLAGS.model}: not a PyTorch checkpoint (a torch.save file)'
        + ('; it looks like a jaxreid .msgpack, which needs no conversion' if msgpack else '')
    )
  report = {}
  try:
    sd = convert.extract_state_dict(torch_file.load(FLAGS.model))
    fmt = convert.detect_format(sd) if FLAGS.format == 'auto' else FLAGS.format
    backbone = convert.checkpoint_backbone(sd, fmt) if FLAGS.backbone == 'auto' else FLAGS.backbone
    arch = ('abmt' if fmt == 'abmt' else 'resnet') if FLAGS.arch == 'auto' else FLAGS.arch
    model = models.create_model(
        arch=arch,
        backbone=backbone,
        depth=FLAGS.depth,
        width=FLAGS.width,
        ibn=FLAGS.ibn,
        stem_relu={'auto': None, 'true': True, 'false': False}[FLAGS.stem_relu],
        last_stride=FLAGS.last_stride,
        num_classes=FLAGS.num_classes or checkpoint_num_classes(sd) or DEFAULT_NUM_CLASSES,
    )
    variables = convert.convert_state_dict(sd, model, fmt, seed=FLAGS.seed, report=report)
  except (convert.ConversionError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
    where = '' if FLAGS.model in str(e) else f'{FLAGS.model}: '
    raise convert.ConversionError(f'{where}{e}') from e
  checkpoint.save_weights(common.output_path(FLAGS.out), variables)
  print(
      f'{FLAGS.model} (format {report["format"]}) -> {FLAGS.out}: '
      f'{convert.describe_model(model)}; {len(report["loaded"])} tensors loaded, '
      f'{len(report["fresh"])} freshly initialised, {len(report["ignored"])} ignored'
  )
  if report['fresh']:
    parts = sorted({'/'.join(k.split('/')[1:-1][:2]) for k in report['fresh']})
    print(f'  freshly initialised (seed {FLAGS.seed}): ' + ', '.join(parts))
  return 0


if __name__ == '__main__':
  sys.exit(main())
