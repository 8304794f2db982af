"""A small synthetic two-domain person re-ID world, written to disk in the Market-1501 layout.

Why: the whole MMT/ABMT pipeline (pre-training on a source domain, clustering and mean-teacher
training on an unlabelled target domain, evaluation) needs a labelled source, a target with a
genuine domain gap, and must run in minutes on two CPU cores without any download. Real re-ID sets
cannot be redistributed. So we render person-like crops whose *identity* fixes the appearance
(clothing colours and patterns, carried items, hair, body shape) and whose *camera* fixes the
imaging style (illumination, colour cast, saturation, blur, noise, background, viewpoint and
framing). Domain b's identities and cameras are drawn from a's distributions moved a share
`domain_gap` (default 0.5) towards a far style: darker clothes, more long sleeves, a cool colour
cast, darker, blurrier, noisier images, other backgrounds, people smaller in the frame. At 0.5 a
model trained on domain a transfers partly and its features cluster domain b's identities well
enough for pseudo labels to help (measured: experiments/results_synthetic.md); at 1.0 it is close
to chance on domain b.

The world is deterministic from a seed (same bytes on every run), generated into a temporary
folder and renamed into place (an interrupted generation is never read), and read back with the
ordinary Market-1501 reader, so synthetic and real data share one code path.

The renderer (identities, cameras, one crop) is `jaxreid.data.synthetic_render`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from jaxreid.data.readers import DataError
from jaxreid.data.readers import ReidDataset
from jaxreid.data.readers import read_market1501
from jaxreid.data.synthetic_render import VIEWS
from jaxreid.data.synthetic_render import choice
from jaxreid.data.synthetic_render import render_person
from jaxreid.data.synthetic_render import sample_camera
from jaxreid.data.synthetic_render import sample_identity

log = logging.getLogger(__name__)

GENERATOR_VERSION = 4  # 4: domain_gap (b's style part way from a's), 250 test identities
DOMAINS = ('a', 'b')
MANIFEST = 'manifest.json'


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Sizes of the synthetic world. The defaults keep MMT on 2 CPU cores to a few minutes."""

  seed: int = 0
  height: int = 64
  width: int = 32
  num_train_ids: int = 100
  num_test_ids: int = 250  # >= 500 queries in domain b: a stable mAP
  min_images: int = 8  # images per identity, uniform in [min_images, max_images]
  max_images: int = 12
  num_cams_a: int = 4
  num_cams_b: int = 3
  # How far domain b's clothing and camera styles are moved from a's towards b's own (darker,
  # cooler, blurrier, noisier, people smaller in the frame): 0 = one domain, 1 = the far style.
  domain_gap: float = 0.5
  jpeg_quality: int = 92

  def __post_init__(self):
    if self.height < 16 or self.width < 8:
      raise ValueError(f'image size {self.height}x{self.width} too small (>= 16x8)')
    if min(self.num_cams_a, self.num_cams_b) < 2:
      raise ValueError('each domain needs >= 2 cameras (cross-camera matching)')
    if self.min_images < 4 or self.max_images < self.min_images:
      raise ValueError('need 4 <= min_images <= max_images (a test id needs 2 cameras x 2)')
    if self.num_train_ids < 1 or self.num_test_ids < 1:
      raise ValueError('need at least one train and one test identity')
    if not 0.0 <= self.domain_gap <= 1.0:
      raise ValueError(f'domain_gap {self.domain_gap} outside [0, 1]')
    if self.num_train_ids + self.num_test_ids > 499:
      raise ValueError('at most 499 identities per domain (ids are numbered per domain)')


# ---------------------------------------------------------------------------------------------


def _domain_plan(cfg: WorldConfig, domain: str):
  """Which identity appears in which camera how often, and the train/query/gallery split."""
  dcode = DOMAINS.index(domain)
  rng = np.random.default_rng([cfg.seed, dcode, 0])
  num_cams = cfg.num_cams_a if domain == 'a' else cfg.num_cams_b
  pid_offset = 500 * dcode  # domain a: ids 1..; domain b: ids 501..  (disjoint)
  plan = []  # (split, pid, cam(1-based), view-base)
  n_ids = cfg.num_train_ids + cfg.num_test_ids
  for k in range(n_ids):
    pid = pid_offset + k + 1
    is_test = k >= cfg.num_train_ids
    n_img = int(rng.integers(cfg.min_images, cfg.max_images + 1))
    max_k = min(num_cams, n_img // 2) if is_test else num_cams
    n_cams = int(rng.integers(2, max_k + 1))
    cams = np.sort(rng.choice(num_cams, n_cams, replace=False)) + 1
    per_min = 2 if is_test else 1  # test: one query per camera plus >= 1 gallery image
    counts = np.full(n_cams, per_min)
    counts += np.bincount(rng.integers(0, n_cams, n_img - per_min * n_cams), minlength=n_cams)
    for cam, cnt in zip(cams, counts):
      q = int(rng.integers(0, cnt)) if is_test else -1
      for j in range(cnt):
        split = (
            'bounding_box_train' if not is_test else ('query' if j == q else 'bounding_box_test')
        )
        plan.append((split, pid, int(cam)))
  return plan, num_cams


def _write_domain(out: Path, cfg: WorldConfig, domain: str) -> dict:
  dcode = DOMAINS.index(domain)
  plan, num_cams = _domain_plan(cfg, domain)
  cam_rng = np.random.default_rng([cfg.seed, dcode, 1])
  cams = [sample_camera(cam_rng, domain, i, cfg.domain_gap) for i in range(num_cams)]
  id_rng = np.random.default_rng([cfg.seed, dcode, 2])
  idents = {}
  for _, pid, _ in plan:
    if pid not in idents:
      idents[pid] = sample_identity(id_rng, domain, cfg.domain_gap)
  for d in ('bounding_box_train', 'query', 'bounding_box_test'):
    (out / d).mkdir(parents=True)
  # Per-(identity, camera) tracklet: most images keep one walking direction, like the
  # consecutive frames of a real tracklet, so cross-camera matching is the hard part.
  counts = {'bounding_box_train': 0, 'query': 0, 'bounding_box_test': 0}
  base_view = {}
  for seq, (split, pid, cam) in enumerate(plan):
    rng = np.random.default_rng([cfg.seed, dcode, 3, seq])
    c = cams[cam - 1]
    if (pid, cam) not in base_view:
      base_view[(pid, cam)] = VIEWS[choice(rng, 4, c['views'])]
    view = base_view[(pid, cam)] if rng.random() < 0.7 else None
    img = render_person(idents[pid], c, rng, cfg.height, cfg.width, view=view)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='JPEG', quality=cfg.jpeg_quality)
    (out / split / f'{pid:04d}_c{cam}s1_{seq:06d}_00.jpg').write_bytes(buf.getvalue())
    counts[split] += 1
  train_pids = sorted({p for s, p, _ in plan if s == 'bounding_box_train'})
  test_pids = sorted({p for s, p, _ in plan if s != 'bounding_box_train'})
  return dict(
      num_cams=num_cams,
      num_train_ids=len(train_pids),
      num_test_ids=len(test_pids),
      train_pid_range=[train_pids[0], train_pids[-1]],
      test_pid_range=[test_pids[0], test_pids[-1]],
      num_train_images=counts['bounding_box_train'],
      num_query=counts['query'],
      num_gallery=counts['bounding_box_test'],
      identities_sha1=hashlib.sha1(
          json.dumps(
              {
                  str(k): {
                      a: (v.tolist() if isinstance(v, np.ndarray) else v) for a, v in d.items()
                  }
                  for k, d in idents.items()
              },
              sort_keys=True,
          ).encode()
      ).hexdigest(),
  )


def _manifest_matches(root: Path, cfg: WorldConfig) -> bool:
  try:
    m = json.loads((root / MANIFEST).read_text())
  except (OSError, ValueError):
    return False
  return m.get('generator_version') == GENERATOR_VERSION and m.get('config') == dataclasses.asdict(
      cfg
  )


def generate_world(root, config: WorldConfig = WorldConfig()) -> Path:
  """Render both domains into `root` atomically (temp folder in the same parent, then rename).

  `root` must not exist, or be an earlier jaxreid synthetic world (which is replaced). Refuses
  to touch any other existing folder.
  """
  root = Path(root).expanduser().absolute()
  if root.exists() and not (root / MANIFEST).is_file():
    if not root.is_dir() or any(root.iterdir()):
      raise DataError(
          f'synthetic world: {root} exists and is not a jaxreid synthetic world '
          f'(no {MANIFEST}); refusing to write into it'
      )
  root.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.tmp-', dir=root.parent))
  try:
    domains = {d: _write_domain(tmp / f'domain_{d}', config, d) for d in DOMAINS}
    manifest = dict(
        generator_version=GENERATOR_VERSION,
        config=dataclasses.asdict(config),
        layout='market1501',
        domains=domains,
        file_pattern='{pid:04d}_c{cam}s1_{seq:06d}_00.jpg',
    )
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if root.exists():  # an empty folder or an outdated world of ours: swap it out
      old = Path(tempfile.mkdtemp(prefix=f'.{root.name}.old-', dir=root.parent))
      os.rename(root, old / 'w')
      os.rename(tmp, root)
      shutil.rmtree(old, ignore_errors=True)
    else:
      try:
        os.rename(tmp, root)
      except OSError:  # another process finished first
        if not _manifest_matches(root, config):
          raise
        shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log.info('generated synthetic world in %s (%.1f s)', root, time.time() - t0)
  return root


def default_root(config: WorldConfig = WorldConfig()) -> Path:
  """$JAXREID_DATA_CACHE/synthetic/seed{seed} ($JAXREID_DATA_CACHE defaults to ~/.cache/jaxreid);
  non-default sizes get a short hash suffix so that different worlds never share a folder."""
  base = Path(os.environ.get('JAXREID_DATA_CACHE', '~/.cache/jaxreid')).expanduser()
  name = f'seed{config.seed}'
  if dataclasses.replace(config, seed=0) != WorldConfig():
    d = dataclasses.asdict(config)
    d.pop('seed')
    name += '-' + hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
  return base / 'synthetic' / name


def ensure_world(root=None, seed: int = 0, **config_kw) -> Path:
  """Return the world folder for these settings, generating it on first use."""
  cfg = WorldConfig(seed=seed, **config_kw)
  root = Path(root).expanduser() if root is not None else default_root(cfg)
  if _manifest_matches(root, cfg):
    return root
  if (root / MANIFEST).is_file():
    log.info('synthetic world in %s was made with other settings; regenerating', root)
  return generate_world(root, cfg)


def load_synthetic(domain: str, root=None, seed: int = 0, **config_kw) -> ReidDataset:
  """Domain 'a' or 'b' of the synthetic world, read with the Market-1501 reader."""
  if domain not in DOMAINS:
    raise DataError(f"synthetic data set needs domain 'a' or 'b', got {domain!r}")
  world = ensure_world(root, seed=seed, **config_kw)
  return read_market1501(world / f'domain_{domain}', name=f'synthetic_{domain}')
