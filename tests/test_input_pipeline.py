"""Decoding, on-device augmentation statistics and the P x K sampler."""

from __future__ import annotations

from functools import partial
import math
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from jaxreid import input_pipeline as ip
from jaxreid.data import DataError

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


# Tests call the jitted function (as training does); eager op-by-op dispatch is slower to compile.
AUG = jax.jit(ip.augment, static_argnames=('pad', 'flip', 'erasing_prob'))


def _to_uint8(x):
  return np.round((np.asarray(x) * STD + MEAN) * 255).astype(np.int32)


# ------------------------------------------------------------------------------ decoding


def test_decode_images(tmp_path, capsys):
  rng = np.random.default_rng(0)
  paths = []
  for i in range(5):
    a = rng.integers(0, 256, (20 + i, 11, 3), dtype=np.uint8)
    p = tmp_path / f'{i}.jpg'
    Image.fromarray(a).save(p, quality=95)
    paths.append(p)
  g = tmp_path / 'grey.png'  # greyscale PNG -> converted to RGB
  Image.fromarray(rng.integers(0, 256, (16, 8), dtype=np.uint8)).save(g)
  paths.append(g)
  out = ip.decode_images(paths, 16, 8)
  assert out.shape == (6, 16, 8, 3) and out.dtype == np.uint8
  for i, p in enumerate(paths):
    ref = Image.open(p).convert('RGB')
    if ref.size != (8, 16):
      ref = ref.resize((8, 16), Image.BICUBIC)
    np.testing.assert_array_equal(out[i], np.asarray(ref))
  np.testing.assert_array_equal(out[5, ..., 0], out[5, ..., 2])  # grey -> equal channels
  np.testing.assert_array_equal(ip.decode_images(paths, 16, 8, num_threads=1), out)
  assert ip.decode_images([], 16, 8).shape == (0, 16, 8, 3)
  assert capsys.readouterr().err == ''  # small sets: no progress output


def test_decode_errors_and_progress(tmp_path, capsys, monkeypatch):
  good = tmp_path / 'good.jpg'
  Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(good)
  bad = tmp_path / 'corrupt.jpg'
  bad.write_bytes(good.read_bytes()[:40])  # truncated JPEG
  with pytest.raises(DataError, match=r'cannot read image .*corrupt\.jpg'):
    ip.decode_images([good, bad, good], 8, 4)
  with pytest.raises(DataError, match=r'cannot read image .*missing\.jpg'):
    ip.decode_images([tmp_path / 'missing.jpg'], 8, 4, num_threads=1)
  monkeypatch.setattr(ip, 'PROGRESS_MIN_IMAGES', 10)
  monkeypatch.setattr(ip, 'PROGRESS_MIN_SECONDS', 0.0)
  ip.decode_images([good] * 40, 8, 4, num_threads=2)
  err = capsys.readouterr().err
  assert 'decode_images: 40/40 (100%)' in err and err.count('decode_images') >= 3
  ip.decode_images([good] * 40, 8, 4, progress=False)
  assert capsys.readouterr().err == ''


# ------------------------------------------------------------------------------ augmentation


def test_normalize_values():
  x = np.zeros((1, 2, 2, 3), np.uint8)
  x[0, 1] = 255
  y = np.asarray(ip.normalize(x))
  assert y.dtype == np.float32 and y.shape == (1, 2, 2, 3)
  np.testing.assert_allclose(y[0, 0, 0], -MEAN / STD, rtol=1e-6)
  np.testing.assert_allclose(y[0, 1, 0], (1 - MEAN) / STD, rtol=1e-6)


def test_augment_shapes_determinism_and_identity():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (8, 32, 16, 3), dtype=np.uint8)
  k = jax.random.key(0)
  a = AUG(k, x)
  assert a.shape == x.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, AUG(k, x))  # same key, same view
  b = AUG(jax.random.key(1), x)
  assert not np.array_equal(a, b)  # two keys, two views
  plain = AUG(k, x, pad=0, erasing_prob=0, flip=False)
  np.testing.assert_allclose(plain, ip.normalize(x), rtol=1e-6, atol=1e-6)
  # erasing probability may be traced
  f = jax.jit(partial(ip.augment, pad=10, flip=True))
  np.testing.assert_allclose(f(k, x, erasing_prob=0.5), a, rtol=1e-6, atol=1e-6)


def _coord_image(n, h, w):
  """R = row + 1, G = col + 1: every pixel tells where it came from (0 = padding)."""
  x = np.zeros((n, h, w, 3), np.uint8)
  x[..., 0] = np.arange(1, h + 1)[:, None]
  x[..., 1] = np.arange(1, w + 1)[None, :]
  x[..., 2] = 200
  return x


def test_flip_and_crop_statistics():
  n, h, w = 4000, 24, 12
  x = _coord_image(n, h, w)
  y = _to_uint8(AUG(jax.random.key(3), x, pad=0, erasing_prob=0, flip=True))
  flipped = y[:, 0, 0, 1] == w
  assert np.all(flipped | (y[:, 0, 0, 1] == 1))
  assert abs(flipped.mean() - 0.5) < 0.04
  y = _to_uint8(AUG(jax.random.key(4), x, pad=10, erasing_prob=0, flip=False))
  # padding is zeros *before* normalisation
  r, c = y[..., 0], y[..., 1]
  assert np.all((r == 0) == (c == 0))
  rows = np.argmax((r > 0).any(2), 1)  # first output row holding image content
  cols = np.argmax((c > 0).any(1), 1)
  oy = r[np.arange(n), rows, :].max(1) - rows + 9
  ox = c[np.arange(n), :, cols].max(1) - cols + 9
  for off in (oy, ox):
    counts = np.bincount(off, minlength=21)
    assert len(counts) == 21 and counts.min() > 0  # every offset 0..20 occurs
    assert np.abs(counts / n - 1 / 21).max() < 0.025  # ~uniform
    assert abs(off.mean() - 10) < 0.4
  # the content is the source window shifted by (oy - 10, ox - 10), zeros outside the image
  src_r = np.arange(h)[None, :] + oy[:, None] - 9
  np.testing.assert_array_equal(r.max(2), np.where((src_r >= 1) & (src_r <= h), src_r, 0))


def _reference_erasing_stats(h, w, draws, seed=0):
  """The reference's sequential algorithm (python), for comparing distributions."""
  rnd = random.Random(seed)
  erased, areas = 0, []
  for _ in range(draws):
    if rnd.uniform(0, 1) >= 0.5:
      continue
    for _ in range(100):
      ta = rnd.uniform(0.02, 0.4) * h * w
      ar = rnd.uniform(0.3, 1 / 0.3)
      hh, ww = int(round(math.sqrt(ta * ar))), int(round(math.sqrt(ta / ar)))
      if ww < w and hh < h:
        erased += 1
        areas.append(hh * ww / (h * w))
        break
  return erased / draws, np.mean(areas)


def test_random_erasing_statistics():
  n, h, w = 3000, 32, 16
  x = np.zeros((n, h, w, 3), np.uint8)  # normalises to -mean/std, never equal to the fill
  y = np.asarray(AUG(jax.random.key(5), x, pad=0, flip=False, erasing_prob=0.5))
  fill = np.all(y == MEAN, axis=-1)  # the reference quirk: mean values after normalisation
  assert np.all(fill == np.any(y == MEAN, axis=-1))  # all channels filled together
  rest = y[~fill]
  np.testing.assert_allclose(rest, np.broadcast_to(-MEAN / STD, rest.shape), rtol=1e-6)
  erased = fill.any((1, 2))
  frac = fill.sum((1, 2))[erased] / (h * w)
  # each erased region is one rectangle
  rr, cc = fill.any(2), fill.any(1)
  assert np.all(rr[erased].sum(1) * cc[erased].sum(1) == fill.sum((1, 2))[erased])
  assert np.all(np.diff(rr[erased].astype(int), axis=1).clip(0).sum(1) <= 1)
  ref_p, ref_area = _reference_erasing_stats(h, w, 20000)
  assert abs(erased.mean() - ref_p) < 0.04 and abs(ref_p - 0.5) < 0.05
  assert abs(frac.mean() - ref_area) < 0.015
  assert frac.min() >= 0.015 and frac.max() <= 0.45
  # erasing_prob 0 disables it, 1 erases (nearly) every image
  y0 = np.asarray(AUG(jax.random.key(5), x[:200], pad=0, flip=False, erasing_prob=0))
  assert not np.any(np.all(y0 == MEAN, -1))
  y1 = np.asarray(AUG(jax.random.key(6), x[:200], pad=0, flip=False, erasing_prob=1.0))
  assert np.all(y1 == MEAN, -1).any((1, 2)).mean() > 0.97


# ------------------------------------------------------------------------------ sampler


def _world(seed=0):
  """40 ids: 0-9 three cameras x 4 images, 10-19 one camera x 5 images, 20-24 a single image,
  25-29 2 images in camera 0 + 1 in camera 1, 30-39 noise (-1)."""
  pids, cams = [], []
  for p in range(10):
    for c in range(3):
      pids += [p] * 4
      cams += [c] * 4
  for p in range(10, 20):
    pids += [p] * 5
    cams += [1] * 5
  for p in range(20, 25):
    pids.append(p)
    cams.append(2)
  for p in range(25, 30):
    pids += [p, p, p]
    cams += [0, 0, 1]
  pids += [-1] * 7
  cams += [0] * 7
  perm = np.random.default_rng(seed).permutation(len(pids))
  return np.array(pids)[perm], np.array(cams)[perm]


def test_sampler_structure_and_rules():
  pids, cams = _world()
  idx = ip.pk_epoch_indices(
      np.random.default_rng(0), pids, cams, iters=200, batch_size=16, num_instances=4
  )
  assert idx.shape == (200, 16) and idx.dtype == np.int32
  groups = idx.reshape(-1, 4)
  gp = pids[groups]
  assert np.all(gp >= 0)  # noise never sampled
  assert np.all(gp == gp[:, :1])  # K images of one identity
  anchor, rest = groups[:, 0], groups[:, 1:]
  p = gp[:, 0]
  ca, cr = cams[anchor][:, None], cams[rest]
  multi = p < 10  # 8 other-camera images >= K: distinct, all from other cameras
  assert np.all(cr[multi] != ca[multi])
  r = np.sort(rest[multi], 1)
  assert np.all(np.diff(r, axis=1) > 0)
  one_cam = (p >= 10) & (p < 20)  # no other camera: same camera, never the anchor, distinct
  assert np.all(rest[one_cam] != anchor[one_cam, None])
  assert np.all(np.diff(np.sort(rest[one_cam], 1), axis=1) > 0)
  single = (p >= 20) & (p < 25)  # a lone image is repeated K times
  assert single.any() and np.all(rest[single] == anchor[single, None])
  two_cam = p >= 25
  # anchor in camera 0 -> the single camera-1 image 3 times; anchor in camera 1 -> camera 0
  assert np.all(cr[two_cam] != ca[two_cam])
  a1 = two_cam & (cams[anchor] == 0)
  assert a1.any() and np.all(rest[a1] == rest[a1][:, :1])


def test_sampler_other_camera_preference_measured():
  # ids with cameras {0: 6 images, 1: 2 images}: other-camera images are rarer than same-camera
  # ones, yet every pick must come from the other camera.
  pids = np.repeat(np.arange(30), 8)
  cams = np.tile([0] * 6 + [1] * 2, 30)
  idx = ip.pk_epoch_indices(np.random.default_rng(1), pids, cams, iters=100, batch_size=32)
  g = idx.reshape(-1, 4)
  assert np.mean(cams[g[:, 1:]] != cams[g[:, :1]]) == 1.0
  assert abs(np.mean(cams[g[:, 0]] == 1) - 0.25) < 0.05  # anchor uniform over images


def test_sampler_passes_reachability_determinism_speed():
  pids, cams = _world()
  P = 30
  idx = ip.pk_epoch_indices(np.random.default_rng(7), pids, cams, iters=420, batch_size=16)
  # a pass covers every identity once; pass = 120 indices -> 7 whole batches, tail dropped
  per_pass = P * 4 // 16
  for k in range(420 // per_pass):
    ids = pids[idx[k * per_pass : (k + 1) * per_pass].reshape(-1, 4)[:, 0]]
    assert len(set(ids)) == len(ids)
  assert set(np.unique(idx)) == set(np.flatnonzero(pids >= 0))  # every clean sample reachable
  a = ip.pk_epoch_indices(np.random.default_rng(3), pids, cams, iters=10, batch_size=16)
  b = ip.pk_epoch_indices(np.random.default_rng(3), pids, cams, iters=10, batch_size=16)
  c = ip.pk_epoch_indices(np.random.default_rng(4), pids, cams, iters=10, batch_size=16)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # fewer identities than a batch holds: passes are concatenated
  small = ip.pk_epoch_indices(
      np.random.default_rng(0), [5, 5, 9], [0, 1, 0], iters=3, batch_size=16
  )
  assert small.shape == (3, 16) and set(np.unique(small)) == {0, 1, 2}
  with pytest.raises(ValueError, match='non-negative'):
    ip.pk_epoch_indices(np.random.default_rng(0), [-1, -1], [0, 0], iters=1)
  # speed: 30k images, 1500 ids, 400 iterations
  r = np.random.default_rng(0)
  big_p, big_c = r.integers(0, 1500, 30000), r.integers(0, 6, 30000)
  big_p[:300] = -1
  t = time.perf_counter()
  out = ip.pk_epoch_indices(r, big_p, big_c, iters=400, batch_size=64)
  assert time.perf_counter() - t < 1.0 and out.shape == (400, 64)


def test_test_images_is_the_decoded_array_not_a_copy():
  # load_and_decode decodes query + gallery into one array; evaluation reads it without copying.
  both = np.random.default_rng(0).integers(0, 255, (7, 4, 2, 3), dtype=np.uint8)
  ds = ip.DecodedSet(None, both[:2], both[:3], both[3:])
  assert ds.test_images is both
  separate = ip.DecodedSet(None, both[:2], both[:3].copy(), both[3:].copy())
  np.testing.assert_array_equal(separate.test_images, both)
  assert not np.shares_memory(separate.test_images, both)
