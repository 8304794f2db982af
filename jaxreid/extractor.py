"""Re-ID features from Python: images in, L2-normalised feature rows out, and ranking.

`FeatureExtractor` takes any model `inference.load_model` accepts (a work dir, a `.msgpack`, a
PyTorch file) or an already `LoadedModel`. Its preprocessing is torchreid's `FeatureExtractor`'s,
so a converted torchreid model gives torchreid's features: RGB PIL image, `T.Resize((h, w))`
(PIL bilinear), ToTensor and ImageNet Normalize. Only the resize runs on the host (to uint8 at the
model's size); the normalisation runs once, on the device, inside the jitted embedding
(`features.make_embed_fn`). `interpolation='bicubic'` is training's decoding instead
(`input_pipeline`), which `jaxreid.evaluator` and `jaxreid.search` use so that their features equal
the ones evaluated during training. `rank` orders a gallery for each query.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
from typing import Any
from typing import Mapping
from typing import NamedTuple
from typing import Sequence

import numpy as np
from PIL import Image

from jaxreid import inference
from jaxreid.retrieval import distances
from jaxreid.retrieval import reranking

__all__ = ['FeatureExtractor', 'PathFeatures', 'rank', 'top_k_rows', 'INTERPOLATIONS']

INTERPOLATIONS = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}
# Images decoded per step: bounds host memory (256x128 uint8: 2048 images = 200 MB).
CHUNK_IMAGES = 2048
# What a corrupt, truncated or missing file raises while PIL opens and decodes it.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class PathFeatures(NamedTuple):
  """`FeatureExtractor.extract_paths`'s result: rows of `features` are the readable `paths`."""

  features: np.ndarray  # (N, D) float32, unit rows
  paths: list[str]  # readable paths, in the order given
  skipped: list[tuple[str, str]]  # (path, reason) of the unreadable ones


def _as_items(images) -> list:
  """One image (path, PIL image, (H, W[, 3]) array) or a sequence / (N, H, W, 3) array -> list."""
  if isinstance(images, (str, os.PathLike, Image.Image)):
    return [images]
  if isinstance(images, np.ndarray):
    return list(images) if images.ndim == 4 else [images]
  return list(images)


class FeatureExtractor:
  """`extractor(images) -> (N, D)` float32 unit features, for paths, PIL images or uint8 arrays.

  model: a work dir, a `.msgpack` or PyTorch file (with `overrides` as in `inference.load_model`)
  or an `inference.LoadedModel`. image_size: (height, width) fed to the network; None = the
  model's own. batch_size: images per device step (each batch shape compiles once; calls with
  fewer images are padded to a power of two, so varying small calls do not recompile).
  """

  def __init__(
      self,
      model: str | os.PathLike | inference.LoadedModel,
      batch_size: int = 64,
      image_size: tuple[int, int] | None = None,
      *,
      interpolation: str = 'bilinear',
      overrides: Mapping[str, Any] | None = None,
      num_threads: int | None = None,
  ):
    if interpolation not in INTERPOLATIONS:
      raise ValueError(
          f'interpolation must be one of {sorted(INTERPOLATIONS)}, not {interpolation!r}'
      )
    if int(batch_size) < 1:
      raise ValueError(f'batch_size must be at least 1, not {batch_size}')
    if isinstance(model, inference.LoadedModel):
      if overrides:
        raise ValueError('overrides apply when loading a model; this one is already loaded')
      loaded = model
    else:
      loaded = inference.load_model(os.fspath(model), overrides)
    if image_size is not None:
      h, w = (int(s) for s in image_size)
      if h < 16 or w < 16:
        raise inference.InferenceError(f'image_size {h}x{w} is too small (at least 16x16)')
      if (h, w) != (loaded.height, loaded.width):  # a copy: the caller's model keeps its size
        loaded = dataclasses.replace(loaded, height=h, width=w)
    self.loaded = loaded
    self.batch_size = int(batch_size)
    self.interpolation = interpolation
    self.num_threads = num_threads or min(8, os.cpu_count() or 1)

  @property
  def image_size(self) -> tuple[int, int]:
    return self.loaded.height, self.loaded.width

  @property
  def feature_dim(self) -> int:
    return self.loaded.feature_dim

  def __repr__(self) -> str:
    return f'FeatureExtractor({self.loaded.describe()}; {self.interpolation} resize)'

  def __call__(self, images) -> np.ndarray:
    """Features of one image or a list of them, one row each, in order. An unreadable path
    raises `InferenceError` naming it (see `extract_paths` to skip those instead)."""
    items = _as_items(images)
    out = [np.zeros((0, self.feature_dim), np.float32)]
    for s in range(0, len(items), CHUNK_IMAGES):
      chunk = self._map(self._decode, items[s : s + CHUNK_IMAGES])
      out.append(self._embed(np.stack(chunk)))
    return np.concatenate(out)

  def extract_paths(
      self, paths: Sequence[str | os.PathLike], *, skip_unreadable: bool = True
  ) -> PathFeatures:
    """Features of image files -> `PathFeatures(features, paths, skipped)`; unreadable files are
    left out and listed with the reason (or raise `InferenceError` when not skip_unreadable)."""
    paths = [os.fspath(p) for p in paths]
    feats, kept, skipped = [np.zeros((0, self.feature_dim), np.float32)], [], []
    for s in range(0, len(paths), CHUNK_IMAGES):
      part = self.load_images(paths[s : s + CHUNK_IMAGES])
      if part.skipped and not skip_unreadable:
        raise inference.InferenceError('cannot read image %s: %s' % part.skipped[0])
      feats.append(self._embed(part.images))
      kept += part.paths
      skipped += part.skipped
    return PathFeatures(np.concatenate(feats), kept, skipped)

  def load_images(self, paths: Sequence[str | os.PathLike]) -> inference.ImageSet:
    """Decodes files to uint8 (N, H, W, 3) at the model's size; unreadable ones are skipped."""

    def one(p):
      try:
        return self._decode(p), None
      except inference.InferenceError as e:
        return None, str(e.__cause__ or e)

    paths = [os.fspath(p) for p in paths]
    results = self._map(one, paths)
    kept = [(p, im) for p, (im, _) in zip(paths, results) if im is not None]
    images = np.zeros((len(kept), *self.image_size, 3), np.uint8)
    for i, (_, im) in enumerate(kept):
      images[i] = im
    skipped = [(p, err) for p, (im, err) in zip(paths, results) if im is None]
    return inference.ImageSet([p for p, _ in kept], images, skipped)

  def embed(self, images: np.ndarray) -> np.ndarray:
    """Features of uint8 (N, H, W, 3) images already at `image_size` (e.g. `load_images`')."""
    return self._embed(np.asarray(images))

  # ------------------------------------------------------------------------------------------

  def _map(self, fn, items: list) -> list:
    if self.num_threads <= 1 or len(items) <= 1:
      return [fn(x) for x in items]
    with cf.ThreadPoolExecutor(self.num_threads) as ex:  # PIL releases the GIL while decoding
      return list(ex.map(fn, items))

  def _decode(self, item) -> np.ndarray:
    """One image -> uint8 (H, W, 3) at the model's size, as torchreid prepares it."""
    h, w = self.image_size
    if isinstance(item, (str, os.PathLike)):
      try:
        with Image.open(item) as im:
          return self._resize(im.convert('RGB'), h, w)  # convert() decodes: truncation fails here
      except _DECODE_ERRORS as e:
        raise inference.InferenceError(f'cannot read image {os.fspath(item)}: {e}') from e
    if isinstance(item, np.ndarray):
      if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] == 3)):
        raise inference.InferenceError(
            f'an image array must be uint8 (H, W, 3) RGB (or (H, W) grey), got {item.dtype} '
            f'{item.shape}'
        )
      item = Image.fromarray(np.ascontiguousarray(item))
    if isinstance(item, Image.Image):
      return self._resize(item if item.mode == 'RGB' else item.convert('RGB'), h, w)
    raise TypeError(
        f'cannot extract features of a {type(item).__name__}: give image paths, PIL images or '
        'uint8 (H, W, 3) arrays'
    )

  def _resize(self, im: Image.Image, h: int, w: int) -> np.ndarray:
    if im.size != (w, h):  # torchvision's Resize((h, w)) on a PIL image is exactly this call
      im = im.resize((w, h), INTERPOLATIONS[self.interpolation])
    return np.asarray(im, dtype=np.uint8)

  def _embed(self, images: np.ndarray) -> np.ndarray:
    """`LoadedModel.extract`, with fewer images than a batch padded to the next power of two:
    calls of any size compile at most log2(batch_size) + 2 batch shapes."""
    n = len(images)
    if n == 0:
      return np.zeros((0, self.feature_dim), np.float32)
    size = min(self.batch_size, 1 << (n - 1).bit_length()) if n < self.batch_size else n
    if size > n:
      images = np.concatenate([images, np.zeros((size - n, *images.shape[1:]), np.uint8)])
    return self.loaded.extract(images, self.batch_size)[:n]


def top_k_rows(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Per row of a distance matrix: the k smallest (indices, values), ascending; equal values in
  column order (among the candidates a partial sort keeps)."""
  k = min(int(k), d.shape[1])
  if k < d.shape[1]:
    cand = np.argpartition(d, k - 1, axis=1)[:, :k]
  else:
    cand = np.broadcast_to(np.arange(d.shape[1]), d.shape)
  cd = np.take_along_axis(d, cand, 1)
  order = np.lexsort((cand, cd), axis=1)
  return np.take_along_axis(cand, order, 1).astype(np.int64), np.take_along_axis(cd, order, 1)


def rank(
    query_features,
    gallery_features,
    top_k: int = 10,
    *,
    rerank: bool = False,
    block_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery indices (Q, k) int64 for every query, best first, and their distances (Q, k)
  float32.

  The distance is evaluation's squared Euclidean one (2 - 2cos for unit features;
  `retrieval.distances`, full float32 products, blocked over queries so (Q, G) is never held).
  rerank=True ranks by k-reciprocal re-ranked distances instead (`retrieval.rerank` with
  evaluation's k1=20, k2=6, lambda=0.3; holds (Q, G)). k is capped at the gallery size.
  """
  q, g = distances.f32(query_features), distances.f32(gallery_features)
  if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1] or len(g) == 0 or top_k < 1:
    raise ValueError(
        f'rank: need (Q, D) query and non-empty (G, D) gallery features and top_k >= 1, got '
        f'{q.shape}, {g.shape}, top_k={top_k}'
    )
  if rerank:
    return top_k_rows(reranking.rerank(q, g), top_k)
  k = min(int(top_k), len(g))
  idx, dist = np.zeros((len(q), k), np.int64), np.zeros((len(q), k), np.float32)
  for s, e, block in distances.iter_squared_distance_blocks(q, g, block_size):
    # float32 rounding can leave identical features a hair below 0
    idx[s:e], dist[s:e] = top_k_rows(np.maximum(block, 0.0), k)
  return idx, dist
