"""Jitted, batched extraction of eval features for a whole split.

Every batch has the same shape (the last one is padded and the padding dropped afterwards), so a
split of any size compiles exactly one program. Batches are sharded over the device mesh like
training batches; the images stay uint8 until they are on the device.
"""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from jaxreid import distributed
from jaxreid import input_pipeline
from jaxreid.metrics_writer import Ticker
from jaxreid.retrieval.distances import paired_distance


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
  # Several processes: the features are gathered on every device, so each host can read them all.
  out = batch_sharding if jax.process_count() == 1 else NamedSharding(mesh, P())
  embed_fn = jax.jit(
      embed, in_shardings=(NamedSharding(mesh, P()), batch_sharding), out_shardings=out
  )
  return lambda variables_list, images: embed_fn(
      variables_list, distributed.put(images, batch_sharding)
  )


def extract_features(
    embed_fn: Callable,
    variables_list: Sequence[Any],
    images: np.ndarray,
    batch_size: int = 256,
    label: str = 'features',
) -> np.ndarray:
  """Eval features of `images` (N, H, W, 3) uint8 -> (N, D) float32 numpy array.

  Batches are fetched two behind the one dispatched (the device never waits for the host) and a
  progress line with an ETA is printed for passes longer than a few seconds."""
  n = len(images)
  if n == 0:
    raise ValueError('extract_features: no images')
  batch_size = min(batch_size, _round_up(n, jax.device_count()))
  batch_size = _round_up(batch_size, jax.device_count())
  ticker = Ticker(f'{label} ({n} images)', n)
  outputs, fetched = [], []

  def fetch():
    f, valid = outputs[len(fetched)]
    fetched.append(np.asarray(f)[:valid])
    ticker.tick(valid)

  for start in range(0, n, batch_size):
    batch = images[start : start + batch_size]
    valid = len(batch)
    if valid < batch_size:
      pad = np.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    outputs.append((embed_fn(list(variables_list), batch), valid))
    if len(outputs) - len(fetched) > 2:
      fetch()
  while len(fetched) < len(outputs):
    fetch()
  return np.concatenate(fetched).astype(np.float32)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# Coupling diagnostic (ABMT paper, Figure 4)


def mean_feature_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Mean Euclidean distance between paired rows of two (N, D) feature arrays.

  The "coupling" of two networks (ABMT, Fig. 4): how far apart the eval features of the same
  images are. Mutual teaching drives MMT's two networks together (the distance shrinks towards 0,
  and they stop correcting each other's pseudo-label errors); ABMT's asymmetric branches are meant
  to stay apart. Identical networks give exactly 0.
  """
  return float(np.mean(paired_distance(a, b)))


def branch_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Splits ABMTNet's eval feature [avg, max] into its two branches, each L2-normalised."""
  d = features.shape[1] // 2
  halves = features[:, :d], features[:, d:]
  return tuple(h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12) for h in halves)


def average_features(feature_sets: Sequence[np.ndarray], renormalize: bool) -> np.ndarray:
  """Mean of several networks' unit features (MMT clusters on its two teachers' average).

  The reference's K-means script clusters the plain mean `(f1 + f2) / 2`; its DBSCAN script
  re-normalises the mean (docs/reference.md section 3): `renormalize` chooses."""
  if len(feature_sets) == 1:
    return feature_sets[0]
  f = sum(np.asarray(x, np.float32) for x in feature_sets) / np.float32(len(feature_sets))
  if renormalize:
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  return f.astype(np.float32)


def coupling(role_features: Mapping[str, np.ndarray], *, two_branch: bool) -> dict[str, float]:
  """The coupling diagnostic from per-network features keyed 'teacher/netK' / 'student/netK'.

  Returns (when the networks exist):
    coupling/teachers         MMT: teacher 1 vs teacher 2;  ABMT: the teacher's two branches
    coupling/students         MMT: student 1 vs student 2;  ABMT: the student's two branches
    coupling/teacher_student  each teacher vs its own student (mean over networks)
  """
  out: dict[str, float] = {}
  teachers = sorted(k for k in role_features if k.startswith('teacher/'))
  students = sorted(k for k in role_features if k.startswith('student/'))
  for name, keys in (('teachers', teachers), ('students', students)):
    if two_branch and len(keys) == 1:
      out[f'coupling/{name}'] = mean_feature_distance(*branch_features(role_features[keys[0]]))
    elif len(keys) == 2:
      out[f'coupling/{name}'] = mean_feature_distance(
          role_features[keys[0]], role_features[keys[1]]
      )
  pairs = [(t, 'student/' + t.split('/', 1)[1]) for t in teachers]
  pairs = [(t, s) for t, s in pairs if s in role_features]
  if pairs:
    out['coupling/teacher_student'] = float(
        np.mean([mean_feature_distance(role_features[t], role_features[s]) for t, s in pairs])
    )
  return out
