"""The flags of the tools that load a trained model and extract features (evaluate, search).

Apart from `common` because the choices come from `jaxreid.models` (which imports JAX), so that
the tools without a model (plots) start without it.
"""

from __future__ import annotations

from absl import flags

from jaxreid import models
from jaxreid.tools import common


def define(fv: flags.FlagValues, *, exported: str) -> None:
  """`--export_features` (`exported`: what is written besides the features), `--batch_size`
  and the model overrides (`common.MODEL_FLAGS`, all unset by default: `model_overrides`)."""
  flags.DEFINE_string(
      'export_features',
      '',
      f'a folder DIR (created): write features (.npy), {exported} into it',
      flag_values=fv,
  )
  flags.DEFINE_integer('batch_size', 256, 'images per feature batch', lower_bound=1, flag_values=fv)
  flags.DEFINE_enum(
      'arch', None, ['resnet', 'abmt'], 'one branch (ReIDNet) or two (ABMTNet)', flag_values=fv
  )
  flags.DEFINE_enum('backbone', None, models.BACKBONES, 'the backbone network', flag_values=fv)
  flags.DEFINE_integer(
      'depth', None, f'ResNet depth, one of {sorted(models.RESNET_SPECS)}', flag_values=fv
  )
  flags.DEFINE_integer('width', None, 'network width (64 = standard ResNet)', flag_values=fv)
  flags.DEFINE_bool('ibn', None, 'IBN-ResNet-a (--noibn: plain ResNet)', flag_values=fv)
  flags.DEFINE_integer('height', None, 'input height (default 256)', flag_values=fv)
  flags.DEFINE_integer('img_width', None, 'input width (default 128)', flag_values=fv)


def model_overrides(fv: flags.FlagValues) -> dict:
  """The model flags' values as `inference.load_model` overrides (unset ones are None: ignored)."""
  return {name: fv[name].value for name in common.MODEL_FLAGS}
