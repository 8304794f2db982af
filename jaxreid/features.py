"""Jitted, batched extraction of eval features for a whole split.

Every batch has the same shape (the last one is padded and the padding dropped afterwards), so a
split of any size compiles exactly one program. Batches are sharded over the device mesh like
training batches; the images stay uint8 until they are on the device.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxreid import input_pipeline


def make_embed_fn(model, mesh: Mesh | None = None) -> Callable:
  """Returns jitted `embed(variables_list, images_uint8) -> unit features`.

  With several variable sets (e.g. MMT's two teachers) their features are averaged and
  re-normalised, as the reference does before clustering.
  """
  def embed(variables_list, images):
    x = input_pipeline.normalize(images)
    feats = [model.apply(v, x, train=False) for v in variables_list]
    f = feats[0] if len(feats) == 1 else sum(feats) / len(feats)
    if len(feats) > 1:
      f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return f

  if mesh is None:
    return jax.jit(embed)
  batch_sharding = NamedSharding(mesh, P('data'))
  return jax.jit(embed, in_shardings=(NamedSharding(mesh, P()), batch_sharding),
                 out_shardings=batch_sharding)


def extract_features(embed_fn: Callable, variables_list: Sequence[Any], images: np.ndarray,
                     batch_size: int = 256) -> np.ndarray:
  """Eval features of `images` (N, H, W, 3) uint8 -> (N, D) float32 numpy array."""
  n = len(images)
  if n == 0:
    raise ValueError('extract_features: no images')
  batch_size = min(batch_size, _round_up(n, jax.device_count()))
  batch_size = _round_up(batch_size, jax.device_count())
  outputs = []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    valid = len(batch)
    if valid < batch_size:
      pad = np.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    outputs.append((embed_fn(list(variables_list), batch), valid))
  # Fetch after dispatching everything, so host transfers overlap device work.
  return np.concatenate([np.asarray(f)[:valid] for f, valid in outputs]).astype(np.float32)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple
