"""Export a jaxreid model back to PyTorch, for the tools that use torchreid / torchvision networks
(trackers such as StrongSORT / BoxMOT ship a torchreid OSNet):

  jaxreid-export --model=WORKDIR --format=torchreid --out=osnet_adapted.pth
  jaxreid-export --model=WORKDIR --format=torchvision --out=mobilenetv2_adapted.pth
  (or python -m jaxreid.tools.export ...)

torchreid (OSNet): the state dict of `torchreid.models.osnet_x0_25(num_classes=K)` (the variant
and K are printed); `load_state_dict(..., strict=True)` accepts it. The network's eval output is
its 512-d fc embedding, the feature the triplet losses trained; with the default head 'bnneck'
jaxreid's own evaluation reads a BN neck behind it, which torchreid has no place for (printed;
docs/reference.md section 9). The classifier holds the cluster centroids, the neck folded in.
torchvision (MobileNetV2): the state dict of `torchvision.models.mobilenet_v2(num_classes=1280)`
whose classifier Linear is jaxreid's BN neck folded into a diagonal matrix and a bias, so
`model(x)` is jaxreid's feature before L2 normalisation. A model trained with last stride 1 needs
`model.features[14].conv[1][0].stride = (1, 1)` after loading (printed).
An ABMT network exports one branch with `--branch=avg` (a plain OSNet / MobileNetV2; the max
branch has an extra block no PyTorch twin has). Writing needs PyTorch installed. Errors are one
line; exit status 2.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags

from jaxreid import export
from jaxreid import inference
from jaxreid import models
from jaxreid.tools import common

FLAGS = common.flag_values()
flags.DEFINE_string('model', None, common.MODEL_HELP, flag_values=FLAGS)
flags.DEFINE_enum(
    'format', None, sorted(export.FORMATS), 'the PyTorch network to write', flag_values=FLAGS
)
flags.DEFINE_string(
    'out', None, 'output PyTorch file (.pth; its folder is created)', flag_values=FLAGS
)
flags.DEFINE_enum('branch', None, ['avg'], 'ABMT networks: the branch to export', flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
  """`jaxreid-export`; argv without the program name (None: the process's). Exit status."""
  return common.run(_export, FLAGS, argv, doc=__doc__, required=('model', 'format', 'out'))


def _export() -> int:
  loaded = inference.load_model(FLAGS.model)
  model, variables = loaded.model, loaded.variables
  if isinstance(model, models.ABMTNet) and FLAGS.branch:
    variables = export.single_branch(variables, FLAGS.branch)
    model = models.create_model({f: getattr(model, f) for f in models.MODEL_FIELDS})
  sd, notes = export.torch_state_dict(model, variables, FLAGS.format)
  if os.path.abspath(FLAGS.out) == os.path.abspath(loaded.weights_path):
    raise export.ExportError('--out would overwrite the model itself; choose another file')
  export.save_torch(common.output_path(FLAGS.out), sd)
  print(f'{FLAGS.model} -> {FLAGS.out} ({FLAGS.format}, {model.backbone}, {len(sd)} tensors)')
  for note in notes:
    print(f'  {note}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
