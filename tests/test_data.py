"""Readers (every layout, junk / distractor rules, every bad-input error), real-set counts and the
TFDS round trip."""

from __future__ import annotations

import os
from pathlib import Path
import sys

import numpy as np
from PIL import Image
import pytest

from jaxreid.data import DataError
from jaxreid.data import ReidDataset
from jaxreid.data import Split
from jaxreid.data import load_dataset
from jaxreid.data import names

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


def write_image(path: Path, seed: int, size=(16, 8)) -> Path:
  """A small random JPEG (H x W = size) at `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)
  return path


@pytest.fixture
def make_market(tmp_path):
  """make_market({'bounding_box_train': ['0002_c1s1_000451_03.jpg', ...], ...}) -> root."""

  def make(spec: dict, root: Path | None = None) -> Path:
    root = root or tmp_path / 'market'
    for i, (folder, names_) in enumerate(spec.items()):
      (root / folder).mkdir(parents=True, exist_ok=True)
      for j, n in enumerate(names_):
        write_image(root / folder / n, seed=1000 * i + j)
    return root

  return make


MARKET = {
    'bounding_box_train': [
        '0007_c2s1_000100_01.jpg',
        '0007_c3s2_000200_02.jpg',
        '0002_c1s1_000451_03.jpg',
        '0002_c6s1_000500_01.jpg',
        '0010_c1s1_000600_01.jpg',
        '-1_c1s1_000001_01.jpg',
        '0000_c2s1_000002_01.jpg',
    ],
    'query': [
        '0011_c1s1_001000_00.jpg',
        '0012_c3s1_001001_00.jpg',
        '-1_c1s1_000003_00.jpg',
        '0000_c1s1_000004_00.jpg',
    ],
    'bounding_box_test': [
        '0011_c2s1_001002_01.jpg',
        '0012_c1s1_001003_01.jpg',
        '0000_c4s1_000005_01.jpg',
        '-1_c5s1_000006_01.jpg',
    ],
}


def _snapshot(root):
  return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob('*'))


# ------------------------------------------------------------------------------ market1501


def test_market1501_reader(make_market):
  root = make_market(MARKET)
  (root / 'bounding_box_test' / 'Thumbs.db').write_bytes(b'not an image')  # ignored
  before = _snapshot(root)
  ds = load_dataset('market1501', root=root)
  assert isinstance(ds, ReidDataset) and ds.name == 'market1501'
  assert _snapshot(root) == before  # nothing written into the user's folder
  tr = ds.train
  names_tr = [os.path.basename(p) for p in tr.paths]
  # junk -1 and distractor 0 dropped from train; sorted by file name; ids relabelled in
  # sorted order of the original ids (2 -> 0, 7 -> 1, 10 -> 2)
  assert names_tr == [
      '0002_c1s1_000451_03.jpg',
      '0002_c6s1_000500_01.jpg',
      '0007_c2s1_000100_01.jpg',
      '0007_c3s2_000200_02.jpg',
      '0010_c1s1_000600_01.jpg',
  ]
  np.testing.assert_array_equal(tr.pids, [0, 0, 1, 1, 2])
  np.testing.assert_array_equal(tr.camids, [0, 5, 1, 2, 0])
  assert tr.pids.dtype == np.int32 and tr.camids.dtype == np.int32
  assert all(os.path.isabs(p) and os.path.isfile(p) for p in tr.paths)
  # query keeps original ids, drops junk and distractors
  np.testing.assert_array_equal(ds.query.pids, [11, 12])
  np.testing.assert_array_equal(ds.query.camids, [0, 2])
  # gallery keeps distractors (pid 0), drops junk
  np.testing.assert_array_equal(ds.gallery.pids, [0, 11, 12])
  np.testing.assert_array_equal(ds.gallery.camids, [3, 1, 0])
  assert ds.num_train_pids == 3 and ds.num_train_images == 5
  assert ds.num_query_images == 2 and ds.num_gallery_images == 3
  assert ds.num_query_pids == 2 and ds.num_gallery_pids == 3
  assert ds.num_cams == 6
  assert 'train 3 ids / 5 images' in ds.summary()


def test_market1501_finds_download_subfolder(make_market, tmp_path):
  make_market(MARKET, root=tmp_path / 'dl' / 'Market-1501-v15.09.15')
  ds = load_dataset('market1501', root=tmp_path / 'dl')
  assert ds.root.endswith('Market-1501-v15.09.15') and ds.num_train_images == 5


def test_load_dataset_root_from_env(make_market, tmp_path, monkeypatch):
  make_market(MARKET, root=tmp_path / 'data' / 'market1501')
  monkeypatch.setenv('JAXREID_DATA', str(tmp_path / 'data'))
  assert load_dataset('market1501').num_train_images == 5


def test_split_validates_lengths():
  with pytest.raises(ValueError):
    Split(np.array(['a', 'b']), np.array([1]), np.array([0, 0]))
  s = Split(['a'], [3], [1])
  assert s.paths.dtype.kind == 'U' and s.pids.dtype == np.int32 and len(s) == 1


# ------------------------------------------------------------------------------ dukemtmc


def test_dukemtmc_reader(make_market):
  root = make_market(
      {
          'bounding_box_train': [
              '0001_c2_f0046182.jpg',
              '0001_c8_f0046300.jpg',
              '0005_c1_f0000001.jpg',
          ],
          'query': ['0010_c7_f0100000.jpg'],
          'bounding_box_test': ['0010_c3_f0100001.jpg', '0000_c1_f0000010.jpg'],
      }
  )
  ds = load_dataset('dukemtmc', root=root)
  np.testing.assert_array_equal(ds.train.pids, [0, 0, 1])
  np.testing.assert_array_equal(ds.train.camids, [1, 7, 0])
  np.testing.assert_array_equal(ds.gallery.pids, [0, 10])
  assert ds.num_cams == 8
  write_image(root / 'query' / '0011_c9_f0000002.jpg', 0)
  with pytest.raises(DataError, match=r'camera 9 out of range.*0011_c9_f0000002\.jpg.*1\.\.8'):
    load_dataset('dukemtmc', root=root)


# ------------------------------------------------------------------------------ msmt17


def _make_msmt(root, train_dir='train', test_dir='test', lists=True):
  entries = {
      'list_train.txt': (
          train_dir,
          [
              ('0000/0000_000_01_0303morning_0015_0.jpg', 0),
              ('0000/0000_001_05_0303morning_0020_1.jpg', 0),
              ('0003/0003_000_15_0303noon_0100_0.jpg', 3),
          ],
      ),
      'list_val.txt': (train_dir, [('0001/0001_000_02_0303afternoon_0001_0.jpg', 1)]),
      'list_query.txt': (test_dir, [('0005/0005_000_03_0113morning_0001_0.jpg', 5)]),
      'list_gallery.txt': (
          test_dir,
          [
              ('0005/0005_001_07_0113morning_0002_0.jpg', 5),
              ('0009/0009_000_12_0113noon_0002_0.jpg', 9),
          ],
      ),
  }
  for k, (lst, (d, items)) in enumerate(entries.items()):
    lines = []
    for j, (rel, pid) in enumerate(items):
      write_image(root / d / rel, 100 * k + j)
      lines.append(f'{rel} {pid}')
    if lists:
      (root / lst).write_text('\n'.join(lines) + '\n')
  return root


def test_msmt17_reader(tmp_path):
  root = _make_msmt(tmp_path / 'MSMT17_V1')
  before = _snapshot(root)
  ds = load_dataset('msmt17', root=tmp_path)  # finds the MSMT17_V1 sub-folder
  assert _snapshot(root) == before
  # train = train list + val list, relabelled (0 -> 0, 1 -> 1, 3 -> 2), camera = 3rd field
  assert [p.split(os.sep)[-3:] for p in ds.train.paths][0] == [
      'train',
      '0000',
      '0000_000_01_0303morning_0015_0.jpg',
  ]
  np.testing.assert_array_equal(ds.train.pids, [0, 0, 2, 1])
  np.testing.assert_array_equal(ds.train.camids, [0, 4, 14, 1])
  np.testing.assert_array_equal(ds.query.pids, [5])
  np.testing.assert_array_equal(ds.query.camids, [2])
  np.testing.assert_array_equal(ds.gallery.pids, [5, 9])
  np.testing.assert_array_equal(ds.gallery.camids, [6, 11])
  assert all(os.sep + 'test' + os.sep in p for p in ds.gallery.paths)
  assert ds.num_train_pids == 3 and ds.num_cams == 15
  assert load_dataset('msmt17', root=root, verify_files=True).num_train_images == 4


@pytest.mark.parametrize(
    'train_dir,test_dir', [('mask_train_v2', 'mask_test_v2'), ('mask_train_V2', 'mask_test_V2')]
)
def test_msmt17_v2_reader(tmp_path, train_dir, test_dir):
  root = _make_msmt(tmp_path / 'MSMT17_V2', train_dir, test_dir)
  ds = load_dataset('msmt17_v2', root=root)
  assert ds.num_train_images == 4 and ds.num_gallery_images == 2
  assert all(os.sep + train_dir + os.sep in p for p in ds.train.paths)
  np.testing.assert_array_equal(ds.gallery.camids, [6, 11])


def test_msmt17_version_mixup_is_explained(tmp_path):
  v1 = _make_msmt(tmp_path / 'v1')
  with pytest.raises(DataError, match=r"mask_train_v2.*layout of 'msmt17'"):
    load_dataset('msmt17_v2', root=v1)
  v2 = _make_msmt(tmp_path / 'v2', 'mask_train_v2', 'mask_test_v2')
  with pytest.raises(DataError, match=r"layout of 'msmt17_v2'"):
    load_dataset('msmt17', root=v2)


def test_msmt17_errors(tmp_path):
  root = _make_msmt(tmp_path / 'nolists', lists=False)
  with pytest.raises(
      DataError,
      match=r'nolists lacks the list file\(s\) list_train\.txt, '
      r'list_val\.txt, list_query\.txt, list_gallery\.txt',
  ):
    load_dataset('msmt17', root=root)
  root = _make_msmt(tmp_path / 'bad')
  (root / 'list_query.txt').write_text('0005/0005_000_03_0113morning_0001_0.jpg\n')
  with pytest.raises(DataError, match=r'line 1 of .*list_query\.txt'):
    load_dataset('msmt17', root=root)
  (root / 'list_query.txt').write_text('0005/badname.jpg 5\n')
  with pytest.raises(DataError, match=r'cannot parse line 1 of .*list_query\.txt.*badname'):
    load_dataset('msmt17', root=root)
  (root / 'list_query.txt').write_text('0005/0005_000_03_0113morning_0099_0.jpg 5\n')
  with pytest.raises(
      DataError,
      match=r'0005_000_03_0113morning_0099_0\.jpg listed in .*' r'list_query\.txt does not exist',
  ):
    load_dataset('msmt17', root=root)
  (root / 'list_query.txt').write_text('\n')
  with pytest.raises(DataError, match=r'list_query\.txt has no entries'):
    load_dataset('msmt17', root=root)


# ------------------------------------------------------------------------------ bad input


def test_bad_input_errors(tmp_path, make_market):
  assert issubclass(DataError, ValueError)
  missing = tmp_path / 'nowhere'
  with pytest.raises(DataError, match=r'root folder .*nowhere does not exist'):
    load_dataset('market1501', root=missing)
  f = tmp_path / 'file.txt'
  f.write_text('x')
  with pytest.raises(DataError, match=r'file\.txt is not a folder'):
    load_dataset('market1501', root=f)
  wrong = tmp_path / 'wrong'
  (wrong / 'images').mkdir(parents=True)
  with pytest.raises(
      DataError,
      match=r'wrong does not have the expected layout: it needs '
      r'bounding_box_train, query, bounding_box_test',
  ):
    load_dataset('market1501', root=wrong)
  with pytest.raises(DataError, match=r'needs train, test'):
    load_dataset('msmt17', root=wrong)
  with pytest.raises(DataError, match=r'no root folder given'):
    load_dataset('dukemtmc')
  with pytest.raises(DataError, match=r"unknown data set 'cuhk99'"):
    load_dataset('cuhk99', root=tmp_path)


def test_no_images_and_unparsable_names(tmp_path, make_market):
  root = make_market(
      {
          'bounding_box_train': [],
          'query': ['0001_c1s1_000001_00.jpg'],
          'bounding_box_test': ['0001_c2s1_000002_00.jpg'],
      }
  )
  with pytest.raises(DataError, match=r'no images .* in .*bounding_box_train'):
    load_dataset('market1501', root=root)
  root = make_market(
      {
          'bounding_box_train': ['0001_c1s1_000001_00.jpg', 'person12.jpg'],
          'query': ['0001_c1s1_000001_00.jpg'],
          'bounding_box_test': ['0001_c2s1_000002_00.jpg'],
      },
      root=tmp_path / 'unparsable',
  )
  with pytest.raises(DataError, match=r'cannot parse file name .*person12\.jpg.*<pid>_c<camera>'):
    load_dataset('market1501', root=root)
  root = make_market(
      {
          'bounding_box_train': ['0001_c0s1_000001_00.jpg'],
          'query': ['0001_c1s1_000001_00.jpg'],
          'bounding_box_test': ['0001_c2s1_000002_00.jpg'],
      },
      root=tmp_path / 'cam0',
  )
  with pytest.raises(DataError, match=r'camera 0 out of range'):
    load_dataset('market1501', root=root)
  root = make_market(
      {
          'bounding_box_train': ['0000_c1s1_000001_00.jpg'],
          'query': ['0001_c1s1_000001_00.jpg'],
          'bounding_box_test': ['0001_c2s1_000002_00.jpg'],
      },
      root=tmp_path / 'onlydistractors',
  )
  with pytest.raises(DataError, match=r'no training images'):
    load_dataset('market1501', root=root)


def test_names():
  assert set(names()) >= {
      'market1501',
      'dukemtmc',
      'msmt17',
      'msmt17_v2',
      'synthetic_a',
      'synthetic_b',
      'synthetic',
  }


# ------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not (SHARED_DATA / 'cuhk03_detected').is_dir(), reason='no ../shared/data')
def test_real_cuhk03_detected_counts():
  ds = load_dataset('market1501', root=SHARED_DATA / 'cuhk03_detected')
  assert ds.num_train_images == 7477 and ds.num_train_pids == 767
  assert ds.num_query_images == 1400 and ds.num_gallery_images == 5220
  assert ds.num_query_pids == 700 and ds.num_cams == 2
  assert set(np.unique(ds.train.pids)) == set(range(767))
  # every test identity: exactly one query per camera
  q = np.stack([ds.query.pids, ds.query.camids], 1)
  assert len(np.unique(q, axis=0)) == len(q)


@pytest.mark.skipif(not (SHARED_DATA / 'pku_reid').is_dir(), reason='no ../shared/data')
def test_real_pku_reid_counts():
  ds = load_dataset('market1501', root=SHARED_DATA / 'pku_reid')
  assert (ds.num_train_images, ds.num_train_pids) == (592, 37)
  assert (ds.num_query_images, ds.num_gallery_images) == (74, 518)


# ------------------------------------------------------------------------------ TFDS


def _check_round_trip(ds_split, rec, depth):
  exp_names = ['/'.join(p.split(os.sep)[-depth:]) for p in ds_split.paths]
  order = np.argsort(exp_names)
  np.testing.assert_array_equal(rec['file_name'], np.array(exp_names)[order])
  np.testing.assert_array_equal(rec['pid'], ds_split.pids[order])
  np.testing.assert_array_equal(rec['camid'], ds_split.camids[order])
  for b, i in zip(rec['image'], order):
    with open(ds_split.paths[i], 'rb') as f:
      assert b == f.read()  # stored bytes are the original file, not re-encoded


def test_tfds_round_trip_market(make_market, tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  from jaxreid.data import tfds_builders

  root = make_market(MARKET)
  before = _snapshot(root)
  data_dir = tmp_path / 'tfds'
  b = tfds_builders.build('market1501', root, data_dir)
  assert _snapshot(root) == before
  assert b.name == 'reid_market1501'
  assert list(data_dir.rglob('*.array_record*'))
  ds = load_dataset('market1501', root=root)
  for split in ('train', 'query', 'gallery'):
    rec = tfds_builders.read_split('reid_market1501', split, data_dir)
    _check_round_trip(getattr(ds, split), rec, 1)
  # decoded pixels through the stock data source equal PIL's decode of the file
  src = tfds.data_source('reid_market1501', data_dir=str(data_dir), split='gallery')
  by_name = {os.path.basename(p): p for p in ds.gallery.paths}
  assert len(src) == len(ds.gallery)
  for i in range(len(src)):
    r = src[i]
    name = r['file_name'].decode() if isinstance(r['file_name'], bytes) else r['file_name']
    np.testing.assert_array_equal(r['image'], np.asarray(Image.open(by_name[name]).convert('RGB')))
  assert 'tensorflow' not in sys.modules  # built and read without TensorFlow


def test_tfds_round_trip_msmt_custom_name(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  from jaxreid.data import tfds_builders

  root = _make_msmt(tmp_path / 'msmt')
  data_dir = tmp_path / 'tfds'
  b = tfds_builders.build('msmt17', root, data_dir, name='reid_msmt17_small')
  assert b.name == 'reid_msmt17_small'
  ds = load_dataset('msmt17', root=root)
  for split in ('train', 'query', 'gallery'):
    _check_round_trip(getattr(ds, split), tfds_builders.read_split(b.name, split, data_dir), 2)
  with pytest.raises(DataError, match='not a folder'):
    tfds_builders.build('msmt17', tmp_path / 'none', data_dir)
