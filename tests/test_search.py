"""`jaxreid-search` (`python -m jaxreid.tools.search`) end to end on a tiny model and folders of awkward images.

The folders mix sizes, modes (L, RGB, RGBA, P) and formats (PNG, JPEG, BMP), hold one corrupt
file and one non-image file, and use Market-1501 names, so matches can be marked by identity.
The ranking is checked against distances recomputed from the exported features, and those
features against an independent extraction.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
from PIL import Image
import pytest

import jaxreid
from jaxreid import checkpoint
from jaxreid import features as features_lib
from jaxreid import inference
from jaxreid import input_pipeline
from jaxreid import models
from jaxreid import numpy_init
from jaxreid import retrieval_figure
from jaxreid import search
from jaxreid.tools import search as search_tool

H, W = 32, 16
MODEL = dict(arch='resnet', depth=18, width=4)
DIM = 32  # 8 * width for a basic-block ResNet
RANK_LINE = re.compile(r'^\s+(\d+)\s+([\d.]+)\s+(yes|no|-)\s+(\S+)$')


def _person(rng, pid, h, w):
  """A crude 'person': a per-identity colour for top and bottom, plus noise."""
  c = np.random.default_rng(pid).integers(0, 256, (2, 3))
  im = np.empty((h, w, 3), float)
  im[: h // 2], im[h // 2 :] = c[0], c[1]
  return np.clip(im + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('search')
  run = root / 'run'
  run.mkdir()
  model = models.create_model(dict(MODEL, num_classes=8))
  checkpoint.save_weights(str(run / 'model.msgpack'), numpy_init.init_variables(model, 3))
  (run / 'config.json').write_text(
      json.dumps(
          {
              'method': 'mmt',
              'model': dict(MODEL, dtype='float32', ibn=False),
              'data': {'height': H, 'width': W, 'eval_batch_size': 8},
          }
      )
  )
  rng = np.random.default_rng(0)
  q, g = root / 'query', root / 'gallery'
  q.mkdir()
  g.mkdir()
  Image.fromarray(_person(rng, 1, 48, 20)).save(q / '0001_c1s1_000101_00.jpg', quality=95)
  Image.fromarray(_person(rng, 2, 70, 30)).convert('L').save(q / '0002_c2s1_000201_00.png')
  Image.fromarray(_person(rng, 3, 32, 16)).save(q / '0003_c1s1_000301_00.bmp')
  gallery = [
      ('0001_c2s1_000102_00.png', 1, (64, 32), 'RGBA'),
      ('0001_c3s1_000103_00.jpg', 1, (128, 64), 'RGB'),
      ('0002_c1s1_000202_00.png', 2, (40, 24), 'P'),
      ('0002_c3s1_000203_00.bmp', 2, (33, 17), 'RGB'),
      ('0003_c2s1_000302_00.png', 3, (256, 128), 'L'),
      ('0004_c1s1_000401_00.jpg', 4, (50, 25), 'RGB'),
  ]
  for name, pid, (h, w), mode in gallery:
    im = Image.fromarray(_person(rng, pid, h, w))
    im = im.convert(mode)
    im.save(g / name, quality=90) if name.endswith('.jpg') else im.save(g / name)
  # The query of identity 1, byte for byte, under a gallery name (another camera).
  shutil.copy(q / '0001_c1s1_000101_00.jpg', g / '0001_c4s1_000104_00.jpg')
  (g / '0005_c1s1_000501_00.jpg').write_bytes(b'\xff\xd8\xff this is not a JPEG')
  (g / 'README.txt').write_text('not an image: ignored, not counted as skipped')
  return dict(root=root, run=str(run), query=str(q), gallery=str(g), num_gallery=7)


def _rank_lines(out):
  return [RANK_LINE.match(l).groups() for l in out.splitlines() if RANK_LINE.match(l)]


def test_search_end_to_end(world, tmp_path, capsys):
  out_png = tmp_path / 'fig' / 'retrieval.png'
  exp = tmp_path / 'exported'
  rc = search_tool.main(
      [
          f'--model={world["run"]}',
          f'--query={world["query"]}',
          f'--gallery={world["gallery"]}',
          '--topk=4',
          f'--out={out_png}',
          f'--export_features={exp}',
          '--batch_size=4',
      ]
  )
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  out = captured.out
  # the corrupt file is named and skipped; the .txt file is not an image and not counted
  assert '0005_c1s1_000501_00.jpg' in captured.err
  assert 'README' not in captured.err
  assert '1 unreadable file(s) skipped' in out
  assert f'3 queries, {world["num_gallery"]} gallery images, top 4 each' in out
  ranks = _rank_lines(out)
  assert len(ranks) == 3 * 4
  assert [int(r[0]) for r in ranks] == [1, 2, 3, 4] * 3

  # The printed ranking is the order of squared distances between the exported features.
  qf = np.load(exp / 'query_features.npy')
  gf = np.load(exp / 'gallery_features.npy')
  assert qf.shape == (3, DIM) and gf.shape == (world['num_gallery'], DIM)
  assert qf.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(qf, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(gf, axis=1), 1.0, atol=1e-5)
  gal = json.loads((exp / 'gallery.json').read_text())
  qry = json.loads((exp / 'query.json').read_text())
  assert [os.path.basename(p) for p in qry['paths']] == sorted(os.listdir(world['query']))
  assert len(gal['paths']) == world['num_gallery']
  assert not any('0005_' in p for p in gal['paths'])
  assert qry['pids'] == [1, 2, 3] and qry['camids'] == [0, 1, 0]
  assert gal['pids'] == [int(os.path.basename(p)[:4]) for p in gal['paths']]
  d = ((qf[:, None] - gf[None]) ** 2).sum(-1)
  for i in range(3):
    rows = ranks[4 * i : 4 * i + 4]
    names = [r[3] for r in rows]
    want = [os.path.basename(gal['paths'][j]) for j in np.argsort(d[i], kind='stable')[:4]]
    assert names == want
    np.testing.assert_allclose([float(r[1]) for r in rows], np.sort(d[i])[:4], atol=2e-4)
    for r in rows:  # match column by identity
      assert r[2] == ('yes' if int(r[3][:4]) == qry['pids'][i] else 'no')
  ranking = json.loads((exp / 'ranking.json').read_text())
  assert [s['path'] for s in ranking['skipped']] == [
      os.path.join(world['gallery'], '0005_c1s1_000501_00.jpg')
  ]

  # The picture: 3 rows of query + top 4 at the model's input size (x4 to 128 px tall).
  layout = retrieval_figure.retrieval_layout(3, 4, (H, W), with_text=True)
  with Image.open(out_png) as im:
    assert im.size == (layout.size[1], layout.size[0])
    img = np.asarray(im.convert('RGB'))
  for i in range(3):
    for j, r in enumerate(ranks[4 * i : 4 * i + 4]):
      t, l, _, _ = layout.cell_box(i, j + 1)
      want = retrieval_figure.MATCH_COLOR if r[2] == 'yes' else retrieval_figure.MISMATCH_COLOR
      assert tuple(img[t, l]) == want

  # Features are the model's: an independent extraction of the query images agrees.
  model = models.create_model(dict(MODEL, num_classes=8))
  variables = checkpoint.read_weights(os.path.join(world['run'], 'model.msgpack'), model)
  images = input_pipeline.decode_images(qry['paths'], H, W)
  ref = features_lib.extract_features(features_lib.make_embed_fn(model), [variables], images)
  np.testing.assert_allclose(qf, ref, atol=1e-5)


def test_identical_image_ranks_first_with_zero_distance(world):
  loaded = inference.load_model(world['run'])
  result = search.search(loaded, world['query'], world['gallery'], topk=3)
  names = [os.path.basename(p) for p in result.gallery.paths]
  i = [os.path.basename(p) for p in result.query.paths].index('0001_c1s1_000101_00.jpg')
  assert names[result.ranked[i, 0]] == '0001_c4s1_000104_00.jpg'
  assert result.distances[i, 0] < 1e-6
  assert result.distances[i, 1] > 10 * max(result.distances[i, 0], 1e-7)  # a real margin
  assert result.is_match[i, 0]
  assert len(result.skipped) == 1


def test_images_of_any_mode_and_size_become_rgb_at_model_size(world):
  paths = inference.list_images(world['gallery'], '--gallery')
  assert not any(p.endswith('.txt') for p in paths)
  extractor = jaxreid.FeatureExtractor(world['run'], interpolation='bicubic')
  assert extractor.image_size == (H, W)  # the run's own input size
  loaded = extractor.load_images(paths)
  assert loaded.images.shape == (world['num_gallery'], H, W, 3)
  assert loaded.images.dtype == np.uint8
  gray = loaded.images[[os.path.basename(p) for p in loaded.paths].index('0003_c2s1_000302_00.png')]
  assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
  assert [os.path.basename(p) for p, _ in loaded.skipped] == ['0005_c1s1_000501_00.jpg']


def test_names_without_identity_give_neutral_borders(world, tmp_path, capsys):
  q, g = tmp_path / 'q', tmp_path / 'g'
  q.mkdir()
  g.mkdir()
  rng = np.random.default_rng(1)
  Image.fromarray(_person(rng, 7, 40, 20)).save(q / 'someone.png')
  for n in range(3):
    Image.fromarray(_person(rng, n, 40, 20)).save(g / f'crop{n}.jpg')
  out_png = tmp_path / 'r.png'
  assert (
      search_tool.main(
          [
              f'--model={world["run"]}',
              f'--query={q / "someone.png"}',
              f'--gallery={g}',
              '--topk=5',
              f'--out={out_png}',
          ]
      )
      == 0
  )
  out = capsys.readouterr().out
  ranks = _rank_lines(out)
  assert len(ranks) == 3  # top 5 of a 3-image gallery
  assert {r[2] for r in ranks} == {'-'}
  assert 'Market-1501 convention' in out and '0 unreadable file(s) skipped' in out
  layout = retrieval_figure.retrieval_layout(1, 3, (H, W), with_text=True)
  img = np.asarray(Image.open(out_png).convert('RGB'))
  assert img.shape[:2] == layout.size
  t, l, _, _ = layout.cell_box(0, 2)
  assert tuple(img[t, l]) == retrieval_figure.NEUTRAL_COLOR


def test_bad_inputs_fail_clearly(world, tmp_path, capsys):
  empty = tmp_path / 'empty'
  (empty / 'sub').mkdir(parents=True)
  args = [f'--model={world["run"]}', f'--query={world["query"]}', '--out=']
  assert search_tool.main(args + [f'--gallery={empty}']) == 2
  err = capsys.readouterr().err
  assert 'no images' in err and str(empty) in err and 'sub-folders (sub)' in err

  assert (
      search_tool.main(
          [
              f'--model={world["run"]}',
              f'--query={tmp_path / "nope.jpg"}',
              f'--gallery={world["gallery"]}',
          ]
      )
      == 2
  )
  assert 'nope.jpg does not exist' in capsys.readouterr().err

  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'x.png').write_bytes(b'garbage')
  assert search_tool.main(args + [f'--gallery={broken}']) == 2
  assert 'none of the 1 file(s)' in capsys.readouterr().err

  assert (
      search_tool.main(
          [
              f'--model={tmp_path / "no_run"}',
              f'--query={world["query"]}',
              f'--gallery={world["gallery"]}',
          ]
      )
      == 2
  )
  assert 'does not exist' in capsys.readouterr().err

  unfinished = tmp_path / 'unfinished'
  (unfinished / 'pretrain_seed1').mkdir(parents=True)
  shutil.copy(os.path.join(world['run'], 'model.msgpack'), unfinished / 'pretrain_seed1')
  assert (
      search_tool.main(
          [f'--model={unfinished}', f'--query={world["query"]}', f'--gallery={world["gallery"]}']
      )
      == 2
  )
  err = capsys.readouterr().err
  assert 'has no model.msgpack' in err and 'pretrain_seed1/model.msgpack' in err


def test_rank_gallery_matches_a_full_sort_and_breaks_ties_by_gallery_order():
  rng = np.random.default_rng(0)
  q, g = rng.normal(size=(70, 8)), rng.normal(size=(30, 8))
  full = ((q[:, None] - g[None]) ** 2).sum(-1)
  ranked, dists = search.rank_gallery(q, g, 5, block=16)  # partial sort, several blocks
  np.testing.assert_array_equal(ranked, np.argsort(full, axis=1, kind='stable')[:, :5])
  np.testing.assert_allclose(dists, np.sort(full, axis=1)[:, :5], atol=1e-9)
  ranked, _ = search.rank_gallery(q, np.concatenate([g, g]), 80)  # k > G: everything
  assert ranked.shape == (70, 60)
  # duplicates tie exactly: the lower gallery index comes first
  np.testing.assert_array_equal(ranked[:, 1], ranked[:, 0] + 30)


def test_search_writes_no_picture_unless_asked(world, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert (
      search_tool.main(
          [
              f'--model={world["run"]}',
              f'--query={world["query"]}',
              f'--gallery={world["gallery"]}',
              '--topk=2',
          ]
      )
      == 0
  )
  assert os.listdir(tmp_path) == []
  assert 'add --out=' in capsys.readouterr().out
