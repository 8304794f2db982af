"""`jaxreid.FeatureExtractor`, `jaxreid.rank` and the tools' use of them.

Parity with torchreid's preprocessing + OSNet on real images and real published weights
(../shared; skipped without them or without torch), written out here in numpy / torch. The rest
runs on a tiny ResNet: inputs of every kind, batching, sizes, unreadable files, ranking against a
NumPy reference, and `jaxreid-evaluate` skipping a corrupt image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import jaxreid
from jaxreid import checkpoint
from jaxreid import inference
from jaxreid import input_pipeline
from jaxreid import models
from jaxreid import numpy_init
from jaxreid import retrieval
from jaxreid.evaluator import Evaluator
from jaxreid.tools import evaluate as evaluate_tool

SHARED = Path(__file__).resolve().parents[1].parent / 'shared'
OSNET_WEIGHTS = SHARED / 'weights' / 'osnet_x0_25_msmt17.pth'
MARKET_QUERY = SHARED / 'data' / 'market1501' / 'query'
PKU_QUERY = SHARED / 'data' / 'pku_reid' / 'query'
H, W = 32, 16
MODEL = dict(arch='resnet', depth=18, width=4)
DIM = 32
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _person(rng, pid, h=40, w=20):
  c = np.random.default_rng(pid).integers(0, 256, (3, 3))
  im = np.empty((h, w, 3), float)
  im[: h // 3], im[h // 3 : 2 * h // 3], im[2 * h // 3 :] = c
  return np.clip(im + rng.normal(0, 20, im.shape), 0, 255).astype(np.uint8)


def _cosine(a, b):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  return (a * b).sum(1)


# ----------------------------------------------------------------------------------------------
# Parity with torchreid on real images


def _torchreid_preprocess(im: Image.Image) -> np.ndarray:
  """torchreid's FeatureExtractor: T.Resize((256, 128)) (PIL bilinear), ToTensor, Normalize."""
  x = np.asarray(im.resize((128, 256), Image.BILINEAR), np.float32) / 255.0
  return ((x - MEAN) / STD).transpose(2, 0, 1)  # CHW


@pytest.mark.skipif(
    not OSNET_WEIGHTS.is_file() or not MARKET_QUERY.is_dir() or not PKU_QUERY.is_dir(),
    reason='needs ../shared/weights/osnet_x0_25_msmt17.pth and ../shared/data (market1501, '
    'pku_reid query folders)',
)
def test_osnet_features_match_torchreid_on_real_images_of_every_input_kind():
  torch = pytest.importorskip('torch', reason='torch is needed for the PyTorch reference')
  import torch_reference as tr

  paths = sorted(str(p) for p in MARKET_QUERY.glob('*.jpg'))[:4]
  paths += sorted(str(p) for p in PKU_QUERY.glob('*.jpg'))[:3]
  pils = [Image.open(p).convert('RGB') for p in paths]
  assert {im.size for im in pils} == {(64, 128), (48, 128)}  # two crop sizes, both resized
  odd = np.asarray(pils[0].resize((41, 97), Image.BICUBIC))  # 97x41, an array
  pils.append(Image.fromarray(odd))

  net = tr.osnet_x0_25(num_classes=1041)
  net.load_state_dict(torch.load(OSNET_WEIGHTS, weights_only=True), strict=True)
  with torch.no_grad():
    x = torch.from_numpy(np.stack([_torchreid_preprocess(im) for im in pils]))
    ref = net.eval()(x).numpy()  # torchreid's eval output: the 512-d fc feature, unnormalised
  ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)

  extractor = jaxreid.FeatureExtractor(str(OSNET_WEIGHTS))
  assert extractor.image_size == (256, 128) and extractor.feature_dim == 512
  for inputs in (paths + [odd], pils, [np.asarray(im) for im in pils]):
    feats = extractor(inputs)
    assert feats.shape == (8, 512) and feats.dtype == np.float32
    cos = _cosine(feats, ref)
    assert cos.min() >= 1 - 1e-4, cos
  # the resize matters: training's bicubic one gives visibly different features
  bicubic = jaxreid.FeatureExtractor(extractor.loaded, interpolation='bicubic')(paths)
  assert _cosine(bicubic, ref[:7]).min() < 1 - 1e-4


# ----------------------------------------------------------------------------------------------
# A tiny model


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('extractor')
  run = root / 'run'
  run.mkdir()
  model = models.create_model(dict(MODEL, num_classes=6))
  checkpoint.save_weights(str(run / 'model.msgpack'), numpy_init.init_variables(model, 5))
  (run / 'config.json').write_text(
      json.dumps({'model': dict(MODEL, dtype='float32'), 'data': {'height': H, 'width': W}})
  )
  rng = np.random.default_rng(0)
  images = root / 'images'
  images.mkdir()
  paths = []
  for i, (h, w, mode) in enumerate(
      [(40, 20, 'RGB'), (64, 32, 'L'), (33, 17, 'RGBA'), (32, 16, 'RGB'), (128, 64, 'P')]
      + [(50, 25, 'RGB'), (97, 41, 'RGB')]
  ):
    p = images / f'{i:02d}.png'
    Image.fromarray(_person(rng, i, h, w)).convert(mode).save(p)
    paths.append(str(p))
  loaded = inference.load_model(str(run))
  return dict(root=root, run=str(run), paths=paths, loaded=loaded)


def test_features_are_unit_rows_for_every_input_kind_and_batching(world):
  paths = world['paths']
  ext = jaxreid.FeatureExtractor(world['loaded'], batch_size=64)
  assert ext.image_size == (H, W) and ext.feature_dim == DIM
  feats = ext(paths)
  assert feats.shape == (len(paths), DIM) and feats.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
  assert np.abs(feats[0] - feats[1]).max() > 1e-3  # different images, different features

  # a single item (path, PathLike, PIL image, array) gives one row, the same as in a list
  rgb = [Image.open(p).convert('RGB') for p in paths]
  for single in (paths[2], Path(paths[2]), rgb[2], np.asarray(rgb[2])):
    one = ext(single)
    assert one.shape == (1, DIM)
    np.testing.assert_allclose(one[0], feats[2], atol=1e-5)
  np.testing.assert_allclose(ext(np.stack([np.asarray(rgb[3])] * 2)), feats[[3, 3]], atol=1e-5)
  np.testing.assert_allclose(ext([np.asarray(im) for im in rgb]), feats, atol=1e-5)
  assert ext([]).shape == (0, DIM)

  # batches smaller than the input (last one padded) and a model given by its path
  small = jaxreid.FeatureExtractor(world['run'], batch_size=3)
  np.testing.assert_allclose(small(paths), feats, atol=1e-5)


def test_resize_modes_and_image_size(world):
  paths, loaded = world['paths'], world['loaded']

  def manual(h, w, resample):
    return np.stack(
        [np.asarray(Image.open(p).convert('RGB').resize((w, h), resample)) for p in paths]
    )

  # bilinear (torchreid's) by default; bicubic is training's decoding, bit for bit
  feats = jaxreid.FeatureExtractor(loaded)(paths)
  np.testing.assert_allclose(feats, loaded.extract(manual(H, W, Image.BILINEAR)), atol=1e-6)
  bicubic = jaxreid.FeatureExtractor(loaded, interpolation='bicubic')(paths)
  np.testing.assert_array_equal(
      bicubic, loaded.extract(input_pipeline.decode_images(paths, H, W), 64)[: len(paths)]
  )

  big = jaxreid.FeatureExtractor(loaded, image_size=(64, 32))
  assert big.image_size == (64, 32) and (loaded.height, loaded.width) == (H, W)
  big_loaded = inference.load_model(world['run'], {'height': 64, 'img_width': 32})
  np.testing.assert_allclose(
      big(paths), big_loaded.extract(manual(64, 32, Image.BILINEAR)), atol=1e-6
  )
  with pytest.raises(ValueError, match='interpolation'):
    jaxreid.FeatureExtractor(loaded, interpolation='nearest')
  with pytest.raises(inference.InferenceError, match='too small'):
    jaxreid.FeatureExtractor(loaded, image_size=(8, 8))
  with pytest.raises(ValueError, match='already loaded'):
    jaxreid.FeatureExtractor(loaded, overrides={'depth': 50})


def test_unreadable_files_raise_or_are_skipped(world, tmp_path):
  paths = world['paths'][:3]
  bad = tmp_path / 'corrupt.jpg'
  bad.write_bytes(b'\xff\xd8\xff garbage, not a JPEG')
  missing = tmp_path / 'missing.jpg'
  ext = jaxreid.FeatureExtractor(world['loaded'])
  with pytest.raises(jaxreid.InferenceError, match='cannot read image .*corrupt.jpg'):
    ext([paths[0], str(bad), paths[1]])
  with pytest.raises(jaxreid.InferenceError, match='missing.jpg'):
    ext(missing)

  out = ext.extract_paths([paths[0], bad, paths[1], missing, paths[2]])
  assert out.paths == paths
  assert [p for p, _ in out.skipped] == [str(bad), str(missing)]
  assert all(reason for _, reason in out.skipped)
  np.testing.assert_allclose(out.features, ext(paths), atol=1e-6)
  with pytest.raises(jaxreid.InferenceError, match='corrupt.jpg'):
    ext.extract_paths([paths[0], bad], skip_unreadable=False)

  with pytest.raises(jaxreid.InferenceError, match='uint8'):
    ext(np.zeros((20, 10, 3), np.float32))
  with pytest.raises(TypeError, match='cannot extract features of a int'):
    ext([paths[0], 3])


def test_import_is_lazy():
  code = (
      'import sys, jaxreid\n'
      'assert "jax" not in sys.modules\n'
      'assert jaxreid.load_model is __import__("jaxreid.inference").inference.load_model\n'
      'assert callable(jaxreid.rank) and "jax" in sys.modules\n'
  )
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


# ----------------------------------------------------------------------------------------------
# rank


def _unit(rng, n, d=16):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_rank_matches_a_full_sort():
  rng = np.random.default_rng(0)
  q, g = _unit(rng, 13), _unit(rng, 40)
  q[0] = g[7]  # an exact match ranks first at distance 0
  full = ((q[:, None].astype(np.float64) - g[None]) ** 2).sum(-1)
  want_idx = np.argsort(full, axis=1)[:, :5]
  gaps = np.diff(np.sort(full, axis=1)[:, :6], axis=1)
  assert gaps.min() > 1e-4  # no near-ties: the order is well defined
  idx, dist = jaxreid.rank(q, g, top_k=5, block_size=4)  # several blocks
  assert idx.shape == dist.shape == (13, 5)
  assert np.issubdtype(idx.dtype, np.integer) and dist.dtype == np.float32
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(dist, np.take_along_axis(full, want_idx, 1), atol=1e-5)
  assert idx[0, 0] == 7 and dist[0, 0] == pytest.approx(0, abs=1e-6) and dist[0, 0] >= 0

  idx, dist = jaxreid.rank(q, g[:3], top_k=10)  # k capped at the gallery size
  assert idx.shape == (13, 3)
  np.testing.assert_array_equal(idx, np.argsort(full[:, :3], axis=1))

  idx, dist = jaxreid.rank(q, g, top_k=4, rerank=True)
  rr = retrieval.rerank(q, g)
  np.testing.assert_array_equal(idx, np.argsort(rr, axis=1, kind='stable')[:, :4])
  np.testing.assert_array_equal(dist, np.sort(rr, axis=1)[:, :4])
  with pytest.raises(ValueError, match='top_k'):
    jaxreid.rank(q, g[:, :8])


# ----------------------------------------------------------------------------------------------
# jaxreid-evaluate skips unreadable images


def _write_market(root, rng):
  """4 identities, one query each (camera 1); gallery: cameras 1-3 and a distractor (pid 0)."""
  for d in ('query', 'bounding_box_test'):
    (root / d).mkdir(parents=True)
  for pid in range(1, 5):
    Image.fromarray(_person(rng, pid)).save(root / 'query' / f'{pid:04d}_c1s1_{pid:06d}_00.jpg')
    for cam in (1, 2, 3):
      Image.fromarray(_person(rng, pid, 48, 24)).save(
          root / 'bounding_box_test' / f'{pid:04d}_c{cam}s1_{100 * pid + cam:06d}_00.png'
      )
  Image.fromarray(_person(rng, 99)).save(root / 'bounding_box_test' / '0000_c2s1_000999_00.jpg')


def test_evaluate_skips_a_corrupt_image_with_a_message(world, tmp_path, capsys):
  market = tmp_path / 'Market'
  _write_market(market, np.random.default_rng(1))
  corrupt = market / 'bounding_box_test' / '0002_c3s1_000777_00.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff truncated')
  rc = evaluate_tool.main(
      [f'--model={world["run"]}', '--data=market1501', f'--data_root={market}', '--batch_size=4']
  )
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  lines = [l for l in captured.err.splitlines() if 'unreadable' in l]
  assert len(lines) == 1 and 'skipped 1 unreadable image(s) of 18' in lines[0]
  assert corrupt.name in lines[0]
  assert 'rank-1' in captured.out

  evaluator = Evaluator.load('market1501', str(market))
  query, gallery = evaluator.query, evaluator.gallery
  results, qf, gf, kept = evaluator.run_model(world['loaded'])
  q_kept, g_kept = kept.query, kept.gallery
  assert len(q_kept) == 4 and len(g_kept) == len(gallery) - 1 == 13
  assert str(corrupt) not in set(g_kept.paths) and str(corrupt) in set(gallery.paths)
  assert gf.shape == (13, DIM)
  good = [p for p in gallery.paths if p != str(corrupt)]
  np.testing.assert_array_equal(g_kept.paths, good)
  loaded = world['loaded']
  want_gf = loaded.extract(input_pipeline.decode_images(good, H, W))
  np.testing.assert_allclose(gf, want_gf, atol=1e-5)
  want = retrieval.market_metrics(qf, gf, q_kept.pids, g_kept.pids, q_kept.camids, g_kept.camids)
  assert results['mAP'] == pytest.approx(want['mAP'])

  # nothing readable left among the queries: a clear error
  for p in query.paths:
    Path(p).write_bytes(b'not an image')
  with pytest.raises(inference.InferenceError, match='no readable query image'):
    evaluator.run_model(loaded)
  assert os.path.basename(query.paths[0]) in capsys.readouterr().err
