"""`jaxreid-evaluate` (`python -m jaxreid.tools.evaluate`) on a tiny Market-layout folder written here.

The printed metrics are compared with an independent recomputation (the model built and loaded
by hand, images decoded and embedded with the library's lower-level functions, then
`retrieval.market_metrics`); the exported features with that extraction. Error cases: a checkpoint of
another architecture, empty / missing folders and models.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from jaxreid import checkpoint
from jaxreid import features as features_lib
from jaxreid import inference
from jaxreid import input_pipeline
from jaxreid import models
from jaxreid import numpy_init
from jaxreid import retrieval
from jaxreid.data import load_dataset
from jaxreid.evaluator import Evaluator
from jaxreid.tools import evaluate as evaluate_tool

H, W = 32, 16
MODEL = dict(arch='resnet', depth=18, width=4)


def _person(rng, pid, h=40, w=20):
  c = np.random.default_rng(pid).integers(0, 256, (3, 3))
  im = np.empty((h, w, 3), float)
  im[: h // 3], im[h // 3 : 2 * h // 3], im[2 * h // 3 :] = c
  return np.clip(im + rng.normal(0, 20, im.shape), 0, 255).astype(np.uint8)


def _write_market(root, rng, *, with_train=True):
  """4 identities; one query each (camera 1); gallery: other cameras, a same-camera image (the
  protocol ignores it), a distractor (pid 0) and a junk image (pid -1, never read)."""
  dirs = ['query', 'bounding_box_test'] + (['bounding_box_train'] if with_train else [])
  for d in dirs:
    (root / d).mkdir(parents=True)
  for pid in range(1, 5):
    Image.fromarray(_person(rng, pid)).save(root / 'query' / f'{pid:04d}_c1s1_{pid:06d}_00.jpg')
    for cam in (1, 2, 3):
      Image.fromarray(_person(rng, pid, 48, 24)).save(
          root / 'bounding_box_test' / f'{pid:04d}_c{cam}s1_{100 * pid + cam:06d}_00.png'
      )
  Image.fromarray(_person(rng, 99)).save(root / 'bounding_box_test' / '0000_c2s1_000999_00.jpg')
  (root / 'bounding_box_test' / '-1_c1s1_000001_00.jpg').write_bytes(b'junk, never decoded')
  if with_train:
    for pid in range(10, 13):
      for cam in (1, 2):
        Image.fromarray(_person(rng, pid)).save(
            root / 'bounding_box_train' / f'{pid:04d}_c{cam}s1_{pid:06d}_00.jpg'
        )


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('evaluate')
  rng = np.random.default_rng(0)
  market = root / 'Market'
  _write_market(market, rng)
  run = root / 'run'
  run.mkdir()
  model = models.create_model(dict(MODEL, num_classes=6))
  checkpoint.save_weights(str(run / 'model.msgpack'), numpy_init.init_variables(model, 5))
  (run / 'config.json').write_text(
      json.dumps(
          {
              'method': 'mmt',
              'model': dict(MODEL, dtype='float32'),
              'data': {'height': H, 'width': W},
          }
      )
  )
  return dict(root=root, market=str(market), run=str(run), model=model)


def parse_table(out: str) -> dict:
  """The results table's header and value rows -> {column: value}."""
  lines = out.splitlines()
  i = next(k for k, l in enumerate(lines) if l.strip().startswith('mAP |'))
  names = [c.strip() for c in lines[i].split('|')]
  values = [c.strip() for c in lines[i + 2].split('|')]
  return dict(zip(names, values))


def independent_features(world, paths, model=None, weights=None):
  model = model or world['model']
  variables = checkpoint.read_weights(weights or os.path.join(world['run'], 'model.msgpack'), model)
  images = input_pipeline.decode_images(paths, H, W)
  return features_lib.extract_features(features_lib.make_embed_fn(model), [variables], images)


def test_printed_metrics_equal_an_independent_recomputation(world, tmp_path, capsys):
  exp = tmp_path / 'features'
  rc = evaluate_tool.main(
      [
          f'--model={world["run"]}',
          '--data=market1501',
          f'--data_root={world["market"]}',
          f'--export_features={exp}',
          '--batch_size=8',
      ]
  )
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  table = parse_table(captured.out)
  assert set(table) == {'mAP', 'rank-1', 'rank-5', 'rank-10', 'queries'}
  assert table['queries'] == '4/4'
  assert 'ResNet-18 (width 4), input 32x16, 32-d features' in captured.out

  ds = load_dataset('market1501', world['market'])
  assert len(ds.gallery) == 13  # 12 + the distractor; the junk image is not read
  qf = independent_features(world, ds.query.paths)
  gf = independent_features(world, ds.gallery.paths)
  want = retrieval.market_metrics(
      qf, gf, ds.query.pids, ds.gallery.pids, ds.query.camids, ds.gallery.camids
  )
  assert float(table['mAP']) == pytest.approx(want['mAP'], abs=0.006)
  assert float(table['rank-1']) == pytest.approx(want['top1'], abs=0.006)
  assert float(table['rank-5']) == pytest.approx(want['top5'], abs=0.006)
  # the protocol matters: counting same-camera matches too would give another mAP here
  naive = retrieval.market_metrics(
      qf, gf, ds.query.pids, ds.gallery.pids, ds.query.camids, ds.gallery.camids + 10
  )
  assert naive['mAP'] != pytest.approx(want['mAP'], abs=0.01)

  # exported features, ids and results
  np.testing.assert_allclose(np.load(exp / 'query_features.npy'), qf, atol=1e-5)
  np.testing.assert_allclose(np.load(exp / 'gallery_features.npy'), gf, atol=1e-5)
  meta = json.loads((exp / 'gallery.json').read_text())
  assert meta['paths'] == list(ds.gallery.paths)
  assert meta['pids'] == ds.gallery.pids.tolist() and meta['camids'] == ds.gallery.camids.tolist()
  assert meta['feature_dim'] == 32 and meta['num_images'] == 13
  saved = json.loads((exp / 'results.json').read_text())
  assert saved['mAP'] == pytest.approx(want['mAP'], abs=1e-3)
  assert saved['rerank'] is False


def test_rerank_and_test_splits_only(world, tmp_path, capsys):
  # A folder with only query/ and bounding_box_test/ is enough for evaluation.
  only_test = tmp_path / 'only_test'
  shutil.copytree(world['market'], only_test, ignore=shutil.ignore_patterns('bounding_box_train'))
  rc = evaluate_tool.main(
      [f'--model={world["run"]}', '--data=market1501', f'--data_root={only_test}', '--rerank']
  )
  out = capsys.readouterr().out
  assert rc == 0
  assert 'test splits only' in out and '(re-ranked)' in out
  ev = Evaluator.load('market1501', str(only_test))
  query, gallery = ev.query, ev.gallery
  qf = independent_features(world, query.paths)
  gf = independent_features(world, gallery.paths)
  want = retrieval.market_metrics(
      qf, gf, query.pids, gallery.pids, query.camids, gallery.camids, rerank=True
  )
  assert float(parse_table(out)['mAP']) == pytest.approx(want['mAP'], abs=0.006)


def test_wrong_architecture_fails_naming_the_mismatch_and_the_fix(world, tmp_path, capsys):
  abmt = models.create_model(dict(arch='abmt', depth=18, width=4, num_classes=6))
  bad = tmp_path / 'bad_run'
  bad.mkdir()
  checkpoint.save_weights(str(bad / 'model.msgpack'), numpy_init.init_variables(abmt, 0))
  shutil.copy(os.path.join(world['run'], 'config.json'), bad / 'config.json')  # says resnet
  args = ['--data=market1501', f'--data_root={world["market"]}']
  assert evaluate_tool.main([f'--model={bad}'] + args) == 2
  err = capsys.readouterr().err
  assert 'do not fit the network built from' in err
  assert 'look like --arch=abmt --depth=18 --width=4' in err
  assert 'missing' in err and 'params/neck/scale' in err
  assert 'unexpected' in err and 'avg_branch' in err

  # The flags the message suggests fix it; ABMT features are 2 x 32-d.
  assert evaluate_tool.main([f'--model={bad}', '--arch=abmt'] + args) == 0
  out = capsys.readouterr().out
  assert 'ABMT-18 (width 4), input 32x16, 64-d features' in out
  assert '--arch=abmt' in out

  # Without any config.json the architecture is read off the weights; input size from flags.
  lone = tmp_path / 'lone'
  lone.mkdir()
  shutil.copy(bad / 'model.msgpack', lone / 'abmt.msgpack')
  assert (
      evaluate_tool.main(
          [f'--model={lone / "abmt.msgpack"}', '--height=32', '--img_width=16'] + args
      )
      == 0
  )
  assert "from the weights' shapes" in capsys.readouterr().out


def test_guess_architecture():
  for kw in (
      dict(arch='resnet', backbone='resnet', depth=18, width=4, ibn=False),
      dict(arch='resnet', backbone='resnet', depth=50, width=4, ibn=True),
      dict(arch='abmt', backbone='resnet', depth=34, width=4, ibn=False),
      dict(arch='resnet', backbone='osnet_x0_5', head='bnneck'),
      dict(arch='abmt', backbone='osnet_x0_25', head='bnneck'),
      dict(arch='resnet', backbone='osnet_x0_25', head='fc_pre_bn'),
      dict(arch='resnet', backbone='mobilenetv2'),
  ):
    v = models.abstract_variables(models.create_model(dict(kw, num_classes=3)), 64, 64)
    assert inference.guess_architecture(v) == kw
  assert inference.guess_architecture({'params': {'foo': {}}}) is None


def test_bad_inputs_fail_clearly(world, tmp_path, capsys):
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert (
      evaluate_tool.main([f'--model={world["run"]}', '--data=market1501', f'--data_root={empty}'])
      == 2
  )
  err = capsys.readouterr().err
  assert str(empty) in err and 'query' in err and 'bounding_box_test' in err

  no_queries = tmp_path / 'no_queries'
  (no_queries / 'query').mkdir(parents=True)
  shutil.copytree(
      os.path.join(world['market'], 'bounding_box_test'), no_queries / 'bounding_box_test'
  )
  assert (
      evaluate_tool.main(
          [f'--model={world["run"]}', '--data=market1501', f'--data_root={no_queries}']
      )
      == 2
  )
  assert 'no images' in capsys.readouterr().err

  assert (
      evaluate_tool.main(
          [f'--model={tmp_path / "missing"}', '--data=market1501', f'--data_root={world["market"]}']
      )
      == 2
  )
  assert 'does not exist' in capsys.readouterr().err

  torch_file = tmp_path / 'model_best.pth.tar'
  torch_file.write_bytes(b'PK')
  assert (
      evaluate_tool.main(
          [f'--model={torch_file}', '--data=market1501', f'--data_root={world["market"]}']
      )
      == 2
  )
  assert '`jaxreid-convert`' in capsys.readouterr().err

  garbage = tmp_path / 'garbage.msgpack'
  garbage.write_bytes(b'\x00\x01 not msgpack')
  assert (
      evaluate_tool.main(
          [f'--model={garbage}', '--data=market1501', f'--data_root={world["market"]}']
      )
      == 2
  )
  assert 'cannot read weights' in capsys.readouterr().err

  assert evaluate_tool.main([f'--model={world["run"]}', '--data=no_such_set']) == 2
  assert 'unknown data set' in capsys.readouterr().err


def test_model_found_from_pretraining_folder(world, tmp_path):
  """pretrain_seed{s}/model.msgpack takes its config.json from the run's work dir above it."""
  run = tmp_path / 'run'
  (run / 'pretrain_seed1').mkdir(parents=True)
  shutil.copy(os.path.join(world['run'], 'config.json'), run / 'config.json')
  shutil.copy(os.path.join(world['run'], 'model.msgpack'), run / 'pretrain_seed1')
  loaded = inference.load_model(str(run / 'pretrain_seed1' / 'model.msgpack'))
  assert loaded.config_path == str(run / 'config.json')
  assert (loaded.height, loaded.width, loaded.feature_dim) == (H, W, 32)
  assert loaded.model.num_classes == 6  # read off the checkpoint's classifier
  overridden = inference.load_model(
      str(run / 'pretrain_seed1' / 'model.msgpack'), {'height': 64, 'img_width': 32, 'depth': None}
  )
  assert (overridden.height, overridden.width) == (64, 32)
  with pytest.raises(inference.InferenceError, match='found below it: pretrain_seed1/model'):
    inference.load_model(str(run))
