"""Fresh model variables drawn with NumPy: the models' initialisers, copied for speed on a CPU.

`model.init` compiles JAX's threefry sampling for every parameter, which takes tens of seconds on
a CPU, also for tiny models; the same laws drawn with NumPy take milliseconds. Used wherever
fresh weights are needed outside a jitted step: the parts of a network a checkpoint does not have
(`jaxreid.convert`), the start of pre-training (`jaxreid.run` / `jaxreid.pretrain`), the
benchmark and the tests.

The *distributions* are those of `model.init` (`jaxreid.layers`, `jaxreid.osnet`): conv kernels
Kaiming-normal fan_out (torchvision's ResNet init), ABMT's `extra` block fan_in with BN scales
~ N(1, 0.02), other BN scales 1, biases and running means 0, running variances 1, classifiers
N(0, 0.001), OSNet's fc Linear N(0, 0.01). The numbers differ from `model.init`'s (another
generator); a change of an initialiser in the models must be mirrored here (tests/test_models.py
checks the extra block's laws against `model.init`'s initialisers).
"""

from __future__ import annotations

import math
from typing import Iterable

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np


def init_variables(
    model, seed: int = 0, example=None, paths: Iterable[tuple[str, ...]] | None = None
) -> dict:
  """Fresh variables (nested dicts of float32 numpy arrays) with `model.init`'s distributions.

  Every leaf has its own stream (seed, path), so `paths` (flattened path tuples, e.g.
  `('params', 'max_classifier', 'kernel')`) selects a subset cheaply and gets the same values as
  the full call. `example`: an input (array or ShapeDtypeStruct; default a 64x64 RGB image, enough
  for ReIDNet / ABMTNet, whose variables do not depend on the input size) for other modules.
  """
  shape = (1, 64, 64, 3) if example is None else example.shape
  x = jax.ShapeDtypeStruct(shape, jnp.float32 if example is None else example.dtype)
  abstract = jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)
  flat = traverse_util.flatten_dict(abstract)
  if paths is not None:
    flat = {p: flat[p] for p in paths}
  return traverse_util.unflatten_dict(
      {path: _draw(path, tuple(spec.shape), seed) for path, spec in flat.items()}
  )


def _draw(path: tuple[str, ...], shape: tuple[int, ...], seed: int) -> np.ndarray:
  collection, top, leaf = path[0], path[1], path[-1]
  rng = np.random.default_rng([seed] + list('/'.join(path).encode()))
  extra = 'extra' in path and 'IN' not in path
  if collection == 'batch_stats':
    value = np.ones(shape) if leaf == 'var' else np.zeros(shape)
  elif leaf == 'kernel' and top.endswith('classifier'):
    value = rng.normal(0.0, 0.001, shape)
  elif leaf == 'kernel' and len(shape) == 2:  # OSNet's fc Linear (torchreid: N(0, 0.01))
    value = rng.normal(0.0, 0.01, shape)
  elif leaf == 'kernel':
    kh, kw, cin, cout = shape
    fan = kh * kw * (cin if extra else cout)
    value = rng.normal(0.0, math.sqrt(2.0 / fan), shape)
  elif leaf == 'scale':
    value = 1.0 + 0.02 * rng.normal(size=shape) if extra else np.ones(shape)
  else:
    value = np.zeros(shape)
  return value.astype(np.float32)
