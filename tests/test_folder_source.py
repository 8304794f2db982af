"""The unlabelled `folder` target: reading a tracker's crops (nesting, cameras, corrupt files, an
empty folder), the config checks that tell a user what to set, and a tiny adaptation from such a
folder, started from a torchreid file, to a torchreid file that PyTorch loads and that gives
jaxreid's features."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
from PIL import Image
import pytest

from configs import folder as folder_config
from configs import mmt as mmt_config
from configs import msmt2market as msmt2market_config
from jaxreid import config_checks
from jaxreid import input_pipeline
from jaxreid.data import DataError
from jaxreid.data import load_dataset


def _write_image(path, seed: int, size=(32, 64)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_folder_reads_every_image_recursively_with_cameras_from_first_level_folders(tmp_path):
  root = tmp_path / 'crops'
  _write_image(root / 'cam_b' / 'track7' / 'deep' / 'x.jpg', 0)
  _write_image(root / 'cam_b' / 'a.png', 1)
  _write_image(root / 'cam_a' / 'z.jpg', 2)
  _write_image(root / 'loose.jpg', 3)  # directly in the root: a camera of its own
  _write_image(root / '.thumbs' / 'hidden.jpg', 4)  # hidden folders are ignored
  _write_image(root / 'cam_a' / '.hidden.jpg', 5)
  (root / 'cam_a' / 'notes.txt').write_text('not an image')
  ds = load_dataset('folder', root)
  rel = [os.path.relpath(p, root) for p in ds.train.paths]
  assert sorted(rel) == sorted(
      ['cam_b/track7/deep/x.jpg', 'cam_b/a.png', 'cam_a/z.jpg', 'loose.jpg']
  )
  assert ds.camera_names == ('.', 'cam_a', 'cam_b')
  cams = {r: ds.camera_names[c] for r, c in zip(rel, ds.train.camids)}
  assert cams == {
      'cam_b/track7/deep/x.jpg': 'cam_b',
      'cam_b/a.png': 'cam_b',
      'cam_a/z.jpg': 'cam_a',
      'loose.jpg': '.',
  }
  assert ds.num_cams == 3 and np.all(ds.train.pids == -1)
  assert not ds.labelled and not ds.has_test_split and ds.skipped == ()


def test_images_directly_in_the_folder_are_one_camera(tmp_path):
  for i in range(3):
    _write_image(tmp_path / f'{uuid.UUID(int=i).hex}.jpg', i)
  ds = load_dataset('folder', tmp_path)
  assert len(ds.train) == 3 and ds.num_cams == 1 and set(ds.train.camids) == {0}


def test_corrupt_files_are_skipped_counted_and_named(tmp_path, capsys):
  root = tmp_path / 'crops'
  for i in range(4):
    _write_image(root / 'c1' / f'{i}.jpg', i)
  (root / 'c1' / 'garbage.jpg').write_bytes(os.urandom(300))
  good = (root / 'c1' / '0.jpg').read_bytes()
  (root / 'c2').mkdir()
  (root / 'c2' / 'truncated.jpg').write_bytes(good[: len(good) // 2])
  ds = load_dataset('folder', root)
  assert len(ds.train) == 4 and ds.camera_names == ('c1',)  # c2 held only a broken file
  assert sorted(os.path.basename(p) for p, _ in ds.skipped) == ['garbage.jpg', 'truncated.jpg']
  decoded = input_pipeline.load_and_decode('folder', str(root), 64, 32)
  assert decoded.train.shape == (4, 64, 32, 3) and len(decoded.query) == 0
  out = capsys.readouterr().out
  assert '4 unlabelled train images from 1 camera(s) (c1)' in out
  assert 'skipped 2 unreadable image file(s): ' in out
  assert 'garbage.jpg' in out and 'truncated.jpg' in out


def test_empty_missing_and_unreadable_folders_are_one_clear_error(tmp_path):
  (tmp_path / 'empty' / 'cam1').mkdir(parents=True)
  with pytest.raises(DataError, match=r'no images .* under .*empty \(searched recursively\)'):
    load_dataset('folder', tmp_path / 'empty')
  with pytest.raises(DataError, match='does not exist'):
    load_dataset('folder', tmp_path / 'missing')
  with pytest.raises(DataError, match='target_root'):
    load_dataset('folder', None)
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'a.jpg').write_bytes(b'not a jpeg')
  with pytest.raises(DataError, match='none of the 1 image files'):
    load_dataset('folder', tmp_path / 'bad')


def test_folder_presets_and_what_they_ask_of_the_user(tmp_path):
  c = folder_config.get_config()
  assert (c.data.target, c.data.target_root, c.export.torch_format) == ('folder', '', 'torchreid')
  assert c.init.skip_pretrain and c.init.pretrained.endswith('osnet_x0_25_msmt17.pth')
  assert os.path.isabs(c.init.pretrained)  # not relative to the current directory
  assert c.cluster.method == 'dbscan' and c.cluster.lam == 0.0
  # The preset differs from the labelled msmt17 -> market1501 task only in where the target is
  # (and in K-means' cluster count, which DBSCAN does not use).
  twin = msmt2market_config.get_config('abmt')
  twin.cluster.num_clusters = 0
  flat = lambda cfg: {k: v for k, v in json.loads(cfg.to_json()).items() if k != 'data'}
  assert {**flat(c), 'export': None} == {**flat(twin), 'export': None}
  with pytest.raises(config_checks.ConfigError, match='config.data.target_root: .*target_root=DIR'):
    config_checks.validate_config(c)
  c.data.target_root = str(tmp_path)
  config_checks.validate_config(c)  # DBSCAN finds the number of clusters itself
  c.train.select_best_on_test = True
  with pytest.raises(config_checks.ConfigError, match='no test set to select on'):
    config_checks.validate_config(c)
  c.data.val_root = str(tmp_path)
  config_checks.validate_config(c)

  m = folder_config.get_config('mmt')
  m.data.target_root = str(tmp_path)
  with pytest.raises(config_checks.ConfigError, match=r'cluster.num_clusters: K-means needs'):
    config_checks.validate_config(m)
  m.cluster.num_clusters = 300
  config_checks.validate_config(m)
  d = folder_config.get_config('mmt,dbscan')
  d.data.target_root = str(tmp_path)
  config_checks.validate_config(d)

  s = mmt_config.get_config()
  s.data.source, s.data.source_root = 'folder', str(tmp_path)
  with pytest.raises(config_checks.ConfigError, match='data.source: an unlabelled folder'):
    config_checks.validate_config(s)


def _market_layout(root, ids=3, per_cam=2):
  """A tiny labelled set in Market layout (query: one image per identity and camera)."""
  k = 0
  for pid in range(1, ids + 1):
    for cam in (1, 2):
      _write_image(root / 'query' / f'{pid:04d}_c{cam}s1_000000_00.jpg', 100 * pid + cam)
      for j in range(per_cam):
        k += 1
        _write_image(root / 'bounding_box_test' / f'{pid:04d}_c{cam}s1_{k:06d}_00.jpg', k)
  return root


def _toy_crops(root, num_ids=4, per_id=6):
  """Crops of `num_ids` people (a colour each, top and bottom) in two camera folders, under
  random file names, plus one corrupt file."""
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (num_ids, 2, 3))
  for pid in range(num_ids):
    for k in range(per_id):
      img = np.empty((64, 32, 3), np.float32)
      img[:32], img[32:] = colours[pid, 0], colours[pid, 1]
      img += rng.normal(0, 15, img.shape)
      path = root / f'cam{k % 2}' / f'{uuid.UUID(int=int(rng.integers(2**62))).hex}.jpg'
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
  (root / 'cam0' / 'broken.jpg').write_bytes(b'\xff\xd8\xff' + bytes(100))
  return root


@pytest.mark.slow
def test_adapt_an_unlabelled_folder_from_a_torchreid_file_to_a_torchreid_file(tmp_path, capsys):
  torch = pytest.importorskip('torch')
  import torch_reference as tr

  from jaxreid import inference
  from jaxreid import run

  torch.manual_seed(0)
  torch.save(tr.osnet_x0_25(num_classes=9).state_dict(), tmp_path / 'start.pth')
  crops = _toy_crops(tmp_path / 'crops')
  c = folder_config.get_config('cluster_baseline')
  c.data.update(dict(target_root=str(crops), height=64, width=32, batch_size=16))
  c.data.update(dict(eval_batch_size=64, val_root=str(_market_layout(tmp_path / 'val'))))
  c.init.pretrained = str(tmp_path / 'start.pth')
  c.cluster.num_clusters = 4
  c.train.update(dict(epochs=1, iters=2, eval_every=1))
  workdir = tmp_path / 'run'
  summary = run.train_and_evaluate(c, str(workdir))
  out = capsys.readouterr().out
  assert '24 unlabelled train images from 2 camera(s) (cam0, cam1)' in out
  assert 'skipped 1 unreadable image file(s): cam0/broken.jpg' in out
  epoch_line = next(
      line for line in out.splitlines() if line.startswith('[cluster_baseline] epoch')
  )
  assert 'clusters 4 noise 0% sizes median' in epoch_line and 'purity' not in epoch_line
  # Evaluated on the labelled validation set, not on the unlabelled target.
  assert np.isfinite(summary['source only']['mAP'])
  assert np.isfinite(summary['cluster_baseline (adapted)']['mAP'])
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  epoch = next(r for r in records if r.get('cluster/num_clusters'))
  assert 'cluster/purity' not in epoch and epoch['cluster/median_cluster'] > 0

  # The torchreid file: PyTorch's OSNet loads it strictly, and its feature (the fc embedding,
  # the input of jaxreid's BN neck: docs/reference.md section 9) is what jaxreid reads off the
  # file.
  sd = torch.load(workdir / 'model.pth', weights_only=True)
  net = tr.osnet_x0_25(num_classes=sd['classifier.weight'].shape[0])
  net.load_state_dict(sd, strict=True)
  net.eval()
  loaded = inference.load_model(str(workdir / 'model.pth'), {'height': 64, 'img_width': 32})
  images = input_pipeline.decode_images(sorted(map(str, crops.glob('cam1/*.jpg'))), 64, 32)
  ours = loaded.extract(images)
  x = (images / 255.0 - np.array(input_pipeline.IMAGENET_MEAN)) / input_pipeline.IMAGENET_STD
  with torch.no_grad():
    theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
  theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
  np.testing.assert_allclose(np.sum(ours * theirs, axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_an_unlabelled_run_without_a_validation_set_trains_and_keeps_the_last_model(
    tmp_path, capsys
):
  """No labels anywhere: nothing is evaluated, the unsupervised signals are logged, the last
  model is written (a small ResNet from a saved start, to keep the test short)."""
  import train_fixtures

  from jaxreid import checkpoint as checkpoint_lib
  from jaxreid import models
  from jaxreid import run

  model = train_fixtures.tiny_model(num_classes=3)
  start = train_fixtures.init_students(model, 1)[0]
  checkpoint_lib.save_weights(str(tmp_path / 'start.msgpack'), start)
  c = mmt_config.get_config()
  c.data.update(dict(target='folder', target_root=str(_toy_crops(tmp_path / 'crops'))))
  c.data.update(dict(height=32, width=16, batch_size=16, eval_batch_size=64))
  c.model.update(dict(depth=18, width=8))
  c.init.checkpoints = (str(tmp_path / 'start.msgpack'),)
  c.cluster.num_clusters = 4
  c.train.update(dict(epochs=2, iters=2, eval_every=1))
  workdir = tmp_path / 'run'
  summary = run.train_and_evaluate(c, str(workdir))
  out = capsys.readouterr().out
  assert '[source only] not evaluated: the target has no labels' in out
  lines = [line for line in out.splitlines() if line.startswith('[mmt] epoch')]
  assert len(lines) == 2 and all('teacher-student' in line and 'mAP' not in line for line in lines)
  assert 'not evaluated' in out.split('mmt: ')[-1]
  assert summary['source only'] == {} and 'mAP' not in summary['mmt (adapted)']
  assert summary['mmt (adapted)']['selection'] == 'last epoch'
  weights = checkpoint_lib.read_weights(str(workdir / 'model.msgpack'))
  assert models.embedding_dim(model) == np.shape(weights['params']['neck']['scale'])[0]
  assert not (workdir / 'model.pth').exists()  # no PyTorch export asked for
