"""jaxreid: unsupervised domain-adaptive person re-identification (MMT, ABMT) in JAX/Flax.

The Python API (`FeatureExtractor`, `rank`, `load_model`, `InferenceError`) is imported on first
use, so that `import jaxreid` and the command lines' `--help` do not load JAX.
"""

import importlib

__version__ = '0.1.0'

_LAZY = {
    'FeatureExtractor': 'jaxreid.extractor',
    'PathFeatures': 'jaxreid.extractor',
    'rank': 'jaxreid.extractor',
    'load_model': 'jaxreid.inference',
    'InferenceError': 'jaxreid.inference',
}
__all__ = ['__version__', *_LAZY]


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(_LAZY[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
