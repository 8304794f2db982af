"""The synthetic two-domain world: determinism, layout, disjoint identities, domain gap, caching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxreid.data import DataError
from jaxreid.data import load_dataset
from jaxreid.data import synthetic
from jaxreid.input_pipeline import decode_images

SMALL = dict(num_train_ids=6, num_test_ids=4, min_images=4, max_images=6)


def _files(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  return synthetic.ensure_world(tmp_path_factory.mktemp('w') / 'world', seed=0, **SMALL)


def test_deterministic_from_seed(world, tmp_path):
  again = synthetic.generate_world(tmp_path / 'again', synthetic.WorldConfig(seed=0, **SMALL))
  assert _files(world) == _files(again)  # same bytes, manifest included
  other = synthetic.generate_world(tmp_path / 'other', synthetic.WorldConfig(seed=1, **SMALL))
  fa, fo = _files(world), _files(other)
  assert any(fa[k] != fo.get(k) for k in fa if k.endswith('.jpg'))


def test_layout_read_by_market_reader(world):
  m = json.loads((world / 'manifest.json').read_text())
  assert m['generator_version'] == synthetic.GENERATOR_VERSION
  for domain in ('a', 'b'):
    ds = load_dataset(f'synthetic_{domain}', root=world, **SMALL)
    same = load_dataset('synthetic', root=world, domain=domain, **SMALL)
    np.testing.assert_array_equal(ds.train.paths, same.train.paths)
    info = m['domains'][domain]
    assert ds.name == f'synthetic_{domain}'
    assert ds.num_train_pids == info['num_train_ids'] == SMALL['num_train_ids']
    assert ds.num_train_images == info['num_train_images']
    assert ds.num_query_images == info['num_query']
    assert ds.num_gallery_images == info['num_gallery']
    assert ds.num_cams == info['num_cams']
    assert ds.num_query_pids == ds.num_gallery_pids == SMALL['num_test_ids']
    # one query per (identity, camera), and each has a cross-camera gallery match
    q = np.stack([ds.query.pids, ds.query.camids], 1)
    assert len(np.unique(q, axis=0)) == len(q)
    for pid, cam in q:
      g = ds.gallery.pids == pid
      assert np.any(g & (ds.gallery.camids != cam))
    # train / test identities are disjoint (original ids via the file names)
    train_orig = {int(p.rsplit('/', 1)[-1][:4]) for p in ds.train.paths}
    assert not train_orig & set(ds.query.pids.tolist())


def test_domains_disjoint_and_different(world):
  a = load_dataset('synthetic_a', root=world, **SMALL)
  b = load_dataset('synthetic_b', root=world, **SMALL)
  ids = lambda ds: (
      {int(p.rsplit('/', 1)[-1][:4]) for p in ds.train.paths} | set(ds.gallery.pids.tolist())
  )
  assert not ids(a) & ids(b)
  m = json.loads((world / 'manifest.json').read_text())['domains']
  assert m['a']['identities_sha1'] != m['b']['identities_sha1']
  xa = decode_images(a.train.paths, 64, 32).astype(np.float32)
  xb = decode_images(b.train.paths, 64, 32).astype(np.float32)
  assert xa.shape[1:] == (64, 32, 3)
  ma, mb = xa.mean((0, 1, 2)), xb.mean((0, 1, 2))
  assert ma.mean() - mb.mean() > 40  # domain b is much darker
  assert np.abs((ma / ma.mean()) - (mb / mb.mean())).max() > 0.05  # different colour casts
  assert xa.std() > xb.std()  # and lower contrast


def test_image_size_and_default_sizes(tmp_path):
  root = synthetic.ensure_world(
      tmp_path / 'w',
      seed=3,
      height=32,
      width=16,
      num_train_ids=2,
      num_test_ids=1,
      min_images=4,
      max_images=4,
  )
  ds = load_dataset(
      'synthetic_b',
      root=root,
      seed=3,
      height=32,
      width=16,
      num_train_ids=2,
      num_test_ids=1,
      min_images=4,
      max_images=4,
  )
  from PIL import Image

  assert Image.open(ds.train.paths[0]).size == (16, 32)
  cfg = synthetic.WorldConfig()
  assert (cfg.height, cfg.width) == (64, 32)
  for d in ('a', 'b'):
    plan, cams = synthetic._domain_plan(cfg, d)
    assert 3 <= cams <= 4
    n_train = sum(s == 'bounding_box_train' for s, _, _ in plan)
    assert 800 <= n_train <= 1200  # ~100 ids x ~10 images
  with pytest.raises(ValueError):
    synthetic.WorldConfig(num_cams_b=1)


def test_cache_location_reuse_and_safety(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXREID_DATA_CACHE', str(tmp_path / 'cache'))
  assert (
      synthetic.default_root(synthetic.WorldConfig(seed=5))
      == tmp_path / 'cache' / 'synthetic' / 'seed5'
  )
  custom = synthetic.default_root(synthetic.WorldConfig(seed=5, **SMALL))
  assert custom.parent == tmp_path / 'cache' / 'synthetic' and custom.name.startswith('seed5-')
  root = synthetic.ensure_world(seed=2, **SMALL)  # generated into the default cache folder
  assert root == synthetic.default_root(synthetic.WorldConfig(seed=2, **SMALL))
  stamp = (root / 'manifest.json').stat().st_mtime_ns
  assert synthetic.ensure_world(seed=2, **SMALL) == root  # reused, not regenerated
  assert (root / 'manifest.json').stat().st_mtime_ns == stamp
  assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temp folders left
  # never writes into a folder that is not one of its worlds
  user = tmp_path / 'mydata'
  user.mkdir()
  (user / 'keep.txt').write_text('x')
  with pytest.raises(DataError, match=r'mydata exists and is not a jaxreid synthetic world'):
    synthetic.ensure_world(user, seed=0, **SMALL)
  assert [p.name for p in user.iterdir()] == ['keep.txt']


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
  real = synthetic._write_domain

  def boom(out, cfg, domain):
    real(out, cfg, domain)
    raise KeyboardInterrupt

  monkeypatch.setattr(synthetic, '_write_domain', boom)
  with pytest.raises(KeyboardInterrupt):
    synthetic.generate_world(tmp_path / 'w', synthetic.WorldConfig(**SMALL))
  assert list(tmp_path.iterdir()) == []  # neither the world nor a temp folder


def test_default_test_split_has_500_queries():
  """The default target's test split is large enough for a stable mAP (>= 500 queries)."""
  plan, _ = synthetic._domain_plan(synthetic.WorldConfig(), 'b')
  assert sum(s == 'query' for s, _, _ in plan) >= 500


def test_domain_gap_moves_b_from_a_towards_its_own_style():
  """gap 0: domain b draws its people and cameras from a's distribution (same random draws give
  the same values); gap 1: b's own style; in between, each range lies between the two."""
  from jaxreid.data import synthetic_render as render

  def identity(domain, gap):
    return render.sample_identity(np.random.default_rng(3), domain, gap)

  def camera(domain, gap):
    return render.sample_camera(np.random.default_rng(3), domain, 0, gap)

  a, b0 = identity('a', 1.0), identity('b', 0.0)
  assert all(np.array_equal(a[k], b0[k]) for k in a)
  style_a, style_b = render._STYLE['a'], render._STYLE['b']
  for gap in (0.0, 0.5, 1.0):
    cam = camera('b', gap)
    for key in ('gain', 'sat', 'blur', 'noise', 'scale'):
      lo, hi = (
          style_a[key][0] + gap * (style_b[key][0] - style_a[key][0]),
          style_a[key][1] + gap * (style_b[key][1] - style_a[key][1]),
      )
      assert lo - 1e-6 <= cam[key] <= hi + 1e-6, (gap, key, cam[key], lo, hi)
  # b's cast turns from a's warm daylight to its own cool cast as the gap grows (blue / red)
  blue_over_red = [camera('b', g)['cast'][2] / camera('b', g)['cast'][0] for g in (0, 0.5, 1)]
  assert blue_over_red[0] < blue_over_red[1] < blue_over_red[2]
  with pytest.raises(ValueError, match='domain_gap'):
    synthetic.WorldConfig(domain_gap=1.5)
