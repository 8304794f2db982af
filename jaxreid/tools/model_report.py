"""Print the standard networks' sizes and costs: parameters, feature dimension, map size, GFLOPs.

  jaxreid-model-report [--height=256] [--img_width=128] [--num_classes=1024]
  (or python -m jaxreid.tools.model_report ...)

One row per network (ResNet-18/34/50/101, IBN-ResNet-50-a, ABMT-ResNet-50, last stride 1):
parameters without and with a `--num_classes`-wide classifier, the eval feature's dimension, the
final feature map's size and the forward GFLOPs per image, counted from the traced program
(2 x multiply-adds of convolutions and matmuls) and by XLA's cost analysis (`jaxreid.flops`).
Shapes only: nothing is computed, so it runs in seconds on any machine.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from jaxreid import flops
from jaxreid.tools import common

FLAGS = common.flag_values()
flags.DEFINE_integer('height', 256, 'input height', lower_bound=16, flag_values=FLAGS)
flags.DEFINE_integer('img_width', 128, 'input width', lower_bound=16, flag_values=FLAGS)
flags.DEFINE_integer('num_classes', 1024, 'classifier width', lower_bound=1, flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxreid-model-report`; argv without the program name (None: the process's). Exit status."""
  return common.run(_report, FLAGS, argv, doc=__doc__)


def _report() -> int:
  print(flops.model_report(FLAGS.height, FLAGS.img_width, num_classes=FLAGS.num_classes))
  return 0


if __name__ == '__main__':
  sys.exit(main())
