"""Convert a PyTorch checkpoint into the project's weight file (.msgpack), executing nothing.

  # torchvision ImageNet ResNet-50 (e.g. resnet50-0676ba61.pth / resnet50-19c8e357.pth)
  jaxreid-convert --input resnet50-0676ba61.pth --output r50.msgpack --arch resnet --depth 50
  # IBN-Net release (keys `module.` prefixed, in a dict under 'state_dict')
  jaxreid-convert --input resnet50_ibn_a.pth.tar --output r50_ibn_a.msgpack \\
      --arch resnet --depth 50 --ibn
  # the same ImageNet weights as the start of an ABMT network (max branch's layer4 copied
  # from layer4, the extra bottleneck, necks and classifiers freshly initialised; --seed)
  jaxreid-convert --input resnet50-0676ba61.pth --output abmt_r50.msgpack --arch abmt --depth 50
  # a released / trained MMT model (`module.base.N...`, `module.feat_bn.*`, `module.classifier.*`)
  jaxreid-convert --input model_best.pth.tar --output mmt.msgpack \\
      --arch resnet --depth 50 [--ibn] --format mmt --num-classes 1024
  # a released / trained ABMT model (`module.base.N`, `global_branch`, `max_branch.0/.1`,
  # `feat_bn(_max)`, `classifier(_max)`)
  jaxreid-convert --input model_best.pth.tar --output abmt.msgpack \\
      --arch abmt --depth 50 [--ibn] --format abmt --num-classes 1024
  (or python -m jaxreid.convert ...)

`--format auto` (default) recognises the layouts from the key names, `--backbone auto` (default)
reads a torchreid OSNet's or a torchvision MobileNetV2's backbone off the checkpoint. The output is
`jaxreid.checkpoint.save_weights`' msgpack of {params, batch_stats}, which `--config.init.*`,
`jaxreid-evaluate` and `jaxreid-search` read (they also take the PyTorch file itself). Reading is
safe: only plain tensor checkpoints are accepted (`jaxreid.convert`). A file that cannot be
converted is one line `error: ...` and exit status 1 (a bad command line: 2); nothing is written.
"""

from __future__ import annotations

import pickle
import sys
from typing import Sequence
import zipfile

from absl import flags

from jaxreid import checkpoint
from jaxreid import convert
from jaxreid import models
from jaxreid.tools import common

FLAGS = flags.FlagValues()
flags.DEFINE_string('input', None, 'PyTorch checkpoint (.pth / .pth.tar)', flag_values=FLAGS)
flags.DEFINE_string('output', None, 'output .msgpack ({params, batch_stats})', flag_values=FLAGS)
flags.DEFINE_enum(
    'arch', 'resnet', ['resnet', 'abmt'], 'one branch (ReIDNet) or two (ABMTNet)', flag_values=FLAGS
)
flags.DEFINE_integer('depth', 50, 'ResNet depth', flag_values=FLAGS)
flags.DEFINE_integer('width', 64, 'ResNet width (64 = standard)', flag_values=FLAGS)
flags.DEFINE_bool('ibn', False, 'IBN-ResNet-a', flag_values=FLAGS)
flags.DEFINE_enum(
    'stem-relu',
    'auto',
    ['auto', 'true', 'false'],
    'ReLU after the stem; auto: False for plain ResNet (MMT/ABMT), True for IBN-a',
    flag_values=FLAGS,
)
flags.DEFINE_integer('last-stride', 1, 'stride of the last stage', flag_values=FLAGS)
flags.DEFINE_integer(
    'num-classes',
    1024,
    'classifier width (a checkpoint classifier fills its first rows)',
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
flags.DEFINE_string(
    'backbone',
    'auto',
    "'auto' (read off the checkpoint), 'resnet', 'osnet_x0_25' .. 'osnet_x1_0', 'mobilenetv2'",
    flag_values=FLAGS,
)
EXIT_FAILED = 1  # the file could not be converted


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxreid-convert`; argv without the program name (None: the process's). Exit status."""
  return common.run(_convert, FLAGS, argv, doc=__doc__, required=('input', 'output'))


def _convert() -> int:
  report = {}
  try:
    sd = convert.extract_state_dict(convert.load_torch_checkpoint(FLAGS.input))
    fmt = convert.detect_format(sd) if FLAGS.format == 'auto' else FLAGS.format
    backbone = convert.checkpoint_backbone(sd, fmt) if FLAGS.backbone == 'auto' else FLAGS.backbone
    model = models.create_model(
        arch=FLAGS.arch,
        backbone=backbone,
        depth=FLAGS.depth,
        width=FLAGS.width,
        ibn=FLAGS.ibn,
        stem_relu={'auto': None, 'true': True, 'false': False}[FLAGS['stem-relu'].value],
        last_stride=FLAGS['last-stride'].value,
        num_classes=FLAGS['num-classes'].value,
    )
    variables = convert.convert_state_dict(sd, model, fmt, seed=FLAGS.seed, report=report)
  except (
      convert.ConversionError,
      pickle.UnpicklingError,
      OSError,
      zipfile.BadZipFile,
      ValueError,
  ) as e:
    return common.fail(f'{FLAGS.input}: {e}', EXIT_FAILED)
  checkpoint.save_weights(FLAGS.output, variables)
  print(
      f'{FLAGS.input} (format {report["format"]}) -> {FLAGS.output}: '
      f'{convert.describe_model(model)}; {len(report["loaded"])} tensors loaded, '
      f'{len(report["fresh"])} freshly initialised, {len(report["ignored"])} ignored'
  )
  if report['fresh']:
    parts = sorted({'/'.join(k.split('/')[1:-1][:2]) for k in report['fresh']})
    print(f'  freshly initialised (seed {FLAGS.seed}): ' + ', '.join(parts))
  return 0


if __name__ == '__main__':
  sys.exit(main())
