"""Input pipeline: decode once on the host, augment on the device, sample P x K batches.

Why this split: re-ID training sets are small images (Market: 13k crops of 128x64 -> 256x128
uint8 = 1.3 GB at most, synthetic worlds a few MB), so decoding + resizing every image once with
PIL and keeping the uint8 array is far cheaper than a per-step host pipeline. The per-step work
(flip, pad + crop, normalisation, random erasing) is a few vectorised array ops that run inside
the jitted training step on the accelerator, so the host never becomes the bottleneck and two
independent views of a batch are simply two PRNG keys. The sampler only produces indices, once
per epoch, on the host.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxreid import distributed
from jaxreid.data import ReidDataset
from jaxreid.data import load_dataset
from jaxreid.data.readers import DataError
from jaxreid.metrics_writer import log

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROGRESS_MIN_IMAGES = 1000  # decode_images prints progress only for sets at least this large
PROGRESS_MIN_SECONDS = 1.0  # ... and only once decoding has taken this long (quiet when fast)

__all__ = [
    'decode_images',
    'normalize',
    'augment',
    'random_erasing',
    'pk_epoch_indices',
    'IMAGENET_MEAN',
    'IMAGENET_STD',
]


# ---------------------------------------------------------------------------------------------
# Decoding (host, once)
# ---------------------------------------------------------------------------------------------


def _load(path: str, height: int, width: int) -> np.ndarray:
  try:
    with Image.open(path) as im:
      im = im.convert('RGB')  # forces the full decode: truncated files fail here
      if im.size != (width, height):
        # PIL bicubic, as torchvision's Resize(interpolation=3) on PIL images does.
        im = im.resize((width, height), Image.BICUBIC)
      return np.asarray(im, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot read image {path}: {e}') from e


def decode_images(
    paths: Sequence[str],
    height: int,
    width: int,
    *,
    progress: bool = True,
    num_threads: int | None = None,
) -> np.ndarray:
  """Decode and bicubic-resize images to uint8 (N, height, width, 3), RGB.

  PIL releases the GIL while decoding/resizing, so a thread pool scales with cores. Progress
  is printed to stderr about every 10% for sets of PROGRESS_MIN_IMAGES or more images. An
  unreadable or corrupt file raises DataError naming it.
  """
  paths = [str(p) for p in paths]
  n = len(paths)
  out = np.empty((n, height, width, 3), np.uint8)
  if n == 0:
    return out
  num_threads = num_threads or min(8, os.cpu_count() or 1)
  chunk = max(1, min(256, n // (4 * num_threads)))
  starts = list(range(0, n, chunk))

  def work(s: int) -> int:
    e = min(s + chunk, n)
    for i in range(s, e):
      out[i] = _load(paths[i], height, width)
    return e - s

  show = progress and n >= PROGRESS_MIN_IMAGES and distributed.is_primary()
  t0, done, next_report = time.time(), 0, 0.1

  def tick(k: int):
    nonlocal done, next_report
    done += k
    # Reports at every 10%, once decoding has taken more than a second (quiet for small sets).
    if show and done / n >= next_report and time.time() - t0 >= PROGRESS_MIN_SECONDS:
      elapsed = time.time() - t0
      print(
          f'decode_images: {done}/{n} ({100 * done / n:.0f}%) {elapsed:.1f}s, '
          f'eta {elapsed * (n - done) / done:.1f}s',
          file=sys.stderr,
          flush=True,
      )
      next_report = np.floor(done / n * 10 + 1) / 10

  if num_threads <= 1:
    for s in starts:
      tick(work(s))
  else:
    with cf.ThreadPoolExecutor(num_threads) as ex:
      futures = [ex.submit(work, s) for s in starts]
      try:
        for f in cf.as_completed(futures):
          tick(f.result())
      except BaseException:
        for f in futures:
          f.cancel()
        raise
  return out


# ---------------------------------------------------------------------------------------------
# Augmentation (device, jit-safe, vectorised over the batch)
# ---------------------------------------------------------------------------------------------


def normalize(images) -> jax.Array:
  """uint8 (..., H, W, 3) -> float32 ImageNet-normalised: (x / 255 - mean) / std."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def random_erasing(
    key,
    x,
    *,
    probability: float = 0.5,
    sl: float = 0.02,
    sh: float = 0.4,
    r1: float = 0.3,
    fill=IMAGENET_MEAN,
    tries: int = 100,
) -> jax.Array:
  """Random erasing as in the reference (Zhong et al.), vectorised over the batch.

  Per image with probability `probability`: up to `tries` candidate rectangles (area fraction
  U(sl, sh), aspect U(r1, 1/r1), h = round(sqrt(area * aspect)), w = round(sqrt(area /
  aspect))); the first with h < H and w < W is placed uniformly (top in [0, H-h], left in
  [0, W-w], both inclusive) and filled per channel with `fill`. If no candidate fits the image is
  left unchanged. All `tries` candidates are drawn at once and the first fitting one selected,
  which has exactly the distribution of the reference's sequential loop. `x` is the
  *normalised* float image: the reference fills with the ImageNet mean values after
  normalisation (its quirk, reproduced).
  """
  B, H, W, C = x.shape
  k_apply, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
  apply = jax.random.uniform(k_apply, (B,)) < probability
  area = jax.random.uniform(k_area, (B, tries), minval=sl, maxval=sh) * (H * W)
  aspect = jax.random.uniform(k_aspect, (B, tries), minval=r1, maxval=1.0 / r1)
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (h < H) & (w < W)
  first = jnp.argmax(fits, axis=1)
  found = jnp.any(fits, axis=1)
  h = jnp.take_along_axis(h, first[:, None], 1)[:, 0]
  w = jnp.take_along_axis(w, first[:, None], 1)[:, 0]
  top = jnp.floor(jax.random.uniform(k_top, (B,)) * (H - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (B,)) * (W - w + 1)).astype(jnp.int32)
  rows = jnp.arange(H)[None, :, None]
  cols = jnp.arange(W)[None, None, :]
  mask = (
      (rows >= top[:, None, None])
      & (rows < (top + h)[:, None, None])
      & (cols >= left[:, None, None])
      & (cols < (left + w)[:, None, None])
      & (apply & found)[:, None, None]
  )
  return jnp.where(mask[..., None], jnp.asarray(fill, x.dtype), x)


def augment(
    key, images_uint8, *, pad: int = 10, erasing_prob: float = 0.5, flip: bool = True
) -> jax.Array:
  """Training augmentation of a uint8 batch (B, H, W, 3) -> float32 normalised (B, H, W, 3).

  Order as the reference: horizontal flip (p=0.5) -> zero-pad `pad` -> random crop back to
  H x W -> [0, 1] -> ImageNet normalisation -> random erasing (p=`erasing_prob`, filled with the
  ImageNet mean values after normalisation). `erasing_prob=0` disables erasing (source
  pre-training). Pure jax.numpy, no Python loop over samples: call it inside jit; two
  independent views are two keys. `pad`, `flip` must be static; `erasing_prob` may be traced.
  """
  x = jnp.asarray(images_uint8)
  B, H, W, C = x.shape
  k_flip, k_crop, k_erase = jax.random.split(key, 3)
  if flip:
    do_flip = jax.random.bernoulli(k_flip, 0.5, (B,))
    x = jnp.where(do_flip[:, None, None, None], x[:, :, ::-1, :], x)
  if pad > 0:
    off = jax.random.randint(k_crop, (2, B), 0, 2 * pad + 1)  # both ends inclusive
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    x = jax.vmap(lambda im, oy, ox: jax.lax.dynamic_slice(im, (oy, ox, 0), (H, W, C)))(
        xp, off[0], off[1]
    )
  x = normalize(x)
  if not (isinstance(erasing_prob, (int, float)) and erasing_prob <= 0):
    x = random_erasing(k_erase, x, probability=erasing_prob)
  return x


# ---------------------------------------------------------------------------------------------
# P x K sampler (host, once per epoch)
# ---------------------------------------------------------------------------------------------


def _distinct_ranks(rng: np.random.Generator, n: np.ndarray, k: int) -> np.ndarray:
  """k distinct uniform ranks in [0, n) for every entry of n (needs n >= k): draw from the
  shrinking range and step over the already chosen ranks in ascending order (exact uniform
  sampling without replacement, vectorised over n)."""
  chosen = []
  for j in range(k):
    r = np.floor(rng.random(n.shape) * (n - j)).astype(np.int64)
    if chosen:
      prev = np.sort(np.stack(chosen, -1), -1)
      for t in range(j):
        r += r >= prev[..., t]
    chosen.append(r)
  return np.stack(chosen, -1)


def pk_epoch_indices(
    rng: np.random.Generator,
    pids,
    camids,
    *,
    iters: int,
    batch_size: int = 64,
    num_instances: int = 4,
) -> np.ndarray:
  """Indices (iters, batch_size) int32 of P x K batches, as the reference sampler draws them.

  One pass visits every identity (pid >= 0; negative labels are clustering noise and never
  appear) once in random order and emits K = num_instances indices for it: a uniformly random
  anchor, then K-1 images of the same identity from cameras other than the anchor's
  (without replacement if there are at least K such images -- the reference's threshold,
  `len(select_cams) >= num_instances` -- else with replacement); if the identity has no other
  camera, from its other images in the anchor's camera (same rule).

  Deviations from the reference, both to keep batches exactly P x K:
    * an identity with a single image yields that image K times (the reference emits it once,
      which shifts every later batch off the identity grid);
    * passes are cut into whole batches and a pass's tail shorter than a batch is dropped, as
      the reference's DataLoader(drop_last=True) does; when one pass is shorter than a batch
      (fewer than batch_size / K identities) passes are concatenated instead (the reference
      would produce no batch at all).

  Vectorised over identities and passes: cost O(iters * batch_size * K), independent of the
  number of images beyond one sort.
  """
  K = int(num_instances)
  if K < 1 or batch_size < 1 or iters < 0:
    raise ValueError(
        f'need num_instances >= 1, batch_size >= 1, iters >= 0; got '
        f'{num_instances}, {batch_size}, {iters}'
    )
  pids = np.asarray(pids).reshape(-1)
  camids = np.asarray(camids).reshape(-1)
  if pids.shape != camids.shape:
    raise ValueError(f'pids {pids.shape} and camids {camids.shape} differ in shape')
  valid = np.flatnonzero(pids >= 0)
  if valid.size == 0:
    raise ValueError('no sample with a non-negative label to draw batches from')
  if iters == 0:
    return np.zeros((0, batch_size), np.int32)

  # Sort the clean samples by (identity, camera): each identity is a contiguous segment, and
  # within it each camera a contiguous sub-segment.
  _, group = np.unique(pids[valid], return_inverse=True)
  group = group.reshape(-1)
  cams = camids[valid]
  order = np.lexsort((cams, group))
  idx_s, g_s, c_s = valid[order], group[order], cams[order]
  P = int(g_s[-1]) + 1
  g_count = np.bincount(g_s, minlength=P)
  g_start = np.concatenate([[0], np.cumsum(g_count)[:-1]])
  new_seg = np.concatenate([[True], (g_s[1:] != g_s[:-1]) | (c_s[1:] != c_s[:-1])])
  seg_id = np.cumsum(new_seg) - 1
  seg_start = np.flatnonzero(new_seg)
  seg_count = np.diff(np.concatenate([seg_start, [len(g_s)]]))
  cam_start, cam_count = seg_start[seg_id], seg_count[seg_id]  # per sorted sample

  pass_len = P * K
  usable = (pass_len // batch_size) * batch_size or pass_len  # drop_last, unless < 1 batch
  total = iters * batch_size
  M = -(-total // usable)  # number of passes

  gs, gc = g_start[None, :], g_count[None, :]  # (1, P)
  anchor = gs + np.floor(rng.random((M, P)) * gc).astype(np.int64)  # (M, P) sorted positions
  a_cs, a_cc = cam_start[anchor], cam_count[anchor]
  n_other = gc - a_cc
  use_other = n_other > 0
  pool = np.where(use_other, n_other, gc - 1)  # candidates: other cams, else same cam - anchor
  if K > 1:
    without = pool >= K
    r_with = np.floor(rng.random((M, P, K - 1)) * np.maximum(pool, 1)[..., None])
    r_without = _distinct_ranks(rng, np.where(without, pool, K), K - 1)
    r = np.where(without[..., None], r_without, r_with.astype(np.int64))
    # rank -> sorted position, skipping the anchor's camera block (other-camera pool) or the
    # anchor itself (same-camera pool)
    base = gs[..., None] + r
    pos_other = base + a_cc[..., None] * (base >= a_cs[..., None])
    pos_same = base + (base >= anchor[..., None])
    pos = np.where(use_other[..., None], pos_other, pos_same)
    pos = np.where((pool == 0)[..., None], anchor[..., None], pos)  # lone image: repeat it
    groups = np.concatenate([anchor[..., None], pos], -1)  # (M, P, K)
  else:
    groups = anchor[..., None]
  perm = np.argsort(rng.random((M, P)), axis=1)  # identities in random order, per pass
  groups = np.take_along_axis(groups, perm[..., None], 1)
  seq = idx_s[groups.reshape(M, pass_len)[:, :usable]].reshape(-1)[:total]
  return seq.reshape(iters, batch_size).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# A data set decoded once


@dataclasses.dataclass
class DecodedSet:
  """A data set with every split decoded once into uint8 arrays (docs/reference.md section 3)."""

  dataset: ReidDataset
  train: np.ndarray
  query: np.ndarray
  gallery: np.ndarray

  @functools.cached_property
  def test_images(self) -> np.ndarray:
    """Query then gallery images in one array (every evaluation extracts them together).

    `load_and_decode` decodes them into one array whose halves are `query` and `gallery`, so
    this is no copy (1.9 GB saved on Market-1501 at 256x128)."""
    q, g, base = self.query, self.gallery, self.query.base
    if (
        base is not None
        and g.base is base
        and len(base) == len(q) + len(g)
        and np.shares_memory(q, base[:1])
        and np.shares_memory(g, base[-1:])
    ):
      return base
    return np.concatenate([q, g])


def load_and_decode(
    name: str,
    root: str | None,
    height: int,
    width: int,
    *,
    synthetic: dict | None = None,
) -> DecodedSet:
  """Reads a data set and decodes its splits once."""
  kwargs = dict(synthetic or {}) if name.startswith('synthetic') else {}
  if distributed.is_primary():  # the synthetic world is generated once, by process 0
    dataset = load_dataset(name, root or None, **kwargs)
  distributed.sync(f'dataset {name}')
  if not distributed.is_primary():
    dataset = load_dataset(name, root or None, **kwargs)
  if dataset.labelled:
    what = f'{len(dataset.train.pids)} train images of {dataset.num_train_pids} ids'
  else:
    what = (
        f'{len(dataset.train.pids)} unlabelled train images from {dataset.num_cams} camera(s) '
        f'({", ".join(dataset.camera_names[:8])}{", ..." if dataset.num_cams > 8 else ""})'
    )
  log(
      f'[data] {name}: {what}, {len(dataset.query.pids)} queries, '
      f'{len(dataset.gallery.pids)} gallery ({dataset.root})'
  )
  if dataset.skipped:
    first = ', '.join(os.path.relpath(p, dataset.root) for p, _ in dataset.skipped[:5])
    log(
        f'[data] skipped {len(dataset.skipped)} unreadable image file(s): {first}'
        + (', ...' if len(dataset.skipped) > 5 else '')
        + f' (first: {dataset.skipped[0][1]})'
    )

  def decode(paths):  # each process decodes its share of the images (one share: all)
    return distributed.gather_rows(
        lambda a, b: decode_images(paths[a:b], height, width), len(paths)
    )

  nq = len(dataset.query.paths)
  test = decode(np.concatenate([dataset.query.paths, dataset.gallery.paths]))
  return DecodedSet(dataset, decode(dataset.train.paths), test[:nq], test[nq:])


def dataset_root(config, which: str) -> str | None:
  root = config.data.get(f'{which}_root', '')
  name = config.data[which]
  if root:
    return root
  if config.data.get('root', '') and not name.startswith('synthetic'):
    return os.path.join(config.data.root, name)
  return None
