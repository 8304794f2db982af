"""Folder readers for person re-ID data sets, all returning one common structure.

Why a common structure: every later stage (decoding, the P x K sampler, clustering, evaluation)
needs only three aligned arrays per split -- image paths, identity ids, 0-based camera ids -- so
each reader's only job is to turn a data set's folder/naming convention into those arrays.

Readers never write anything. The labelled readers never open images: they list folders (or
read MSMT17's list files) and parse file names, so they are fast even for 100k images and safe on a
user's download. The unlabelled folder reader (`read_image_folder`, a tracker's crops) decodes each
file once to drop the unreadable ones, since nothing else tells a corrupt crop from a good one.
Every problem with the input raises :class:`DataError` naming the path and what was expected.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
from pathlib import Path
import re
from typing import Callable
from typing import Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
# An unlabelled folder of crops may hold any format PIL reads.
FOLDER_EXTENSIONS = IMAGE_EXTENSIONS + ('.webp', '.tif', '.tiff', '.ppm')
UNLABELLED = -1  # the identity of an image without a label

# Published sizes (docs/reference.md section 6). Only logged: partial or custom folders in the same
# layout are legitimate, so a mismatch is never an error.
EXPECTED_COUNTS = {
    'market1501': dict(
        num_train_pids=751, num_train_images=12936, num_query_images=3368, num_gallery_images=15913
    ),
    'dukemtmc': dict(
        num_train_pids=702, num_train_images=16522, num_query_images=2228, num_gallery_images=17661
    ),
    'msmt17': dict(
        num_train_pids=1041,
        num_train_images=32621,
        num_query_images=11659,
        num_gallery_images=82161,
    ),
    'msmt17_v2': dict(
        num_train_pids=1041,
        num_train_images=32621,
        num_query_images=11659,
        num_gallery_images=82161,
    ),
}


class DataError(ValueError):
  """Bad input data: the message names the offending path and what was expected."""


# ---------------------------------------------------------------------------------------------
# The common structure
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: aligned arrays of absolute image paths, identity ids and 0-based camera ids."""

  paths: np.ndarray  # (N,) str
  pids: np.ndarray  # (N,) int32
  camids: np.ndarray  # (N,) int32, 0-based

  def __post_init__(self):
    paths = np.asarray(self.paths, dtype=str).reshape(-1)
    pids = np.asarray(self.pids, dtype=np.int32).reshape(-1)
    camids = np.asarray(self.camids, dtype=np.int32).reshape(-1)
    if not (len(paths) == len(pids) == len(camids)):
      raise ValueError(
          f'Split arrays differ in length: paths {len(paths)}, pids {len(pids)}, '
          f'camids {len(camids)}'
      )
    object.__setattr__(self, 'paths', paths)
    object.__setattr__(self, 'pids', pids)
    object.__setattr__(self, 'camids', camids)

  def __len__(self) -> int:
    return len(self.paths)

  @classmethod
  def empty(cls) -> 'Split':
    """A split with no images (an unlabelled set's query and gallery, a test set's train)."""
    return cls(np.zeros(0, str), np.zeros(0, np.int32), np.zeros(0, np.int32))

  @property
  def num_images(self) -> int:
    return len(self.paths)

  @property
  def num_pids(self) -> int:
    return int(np.unique(self.pids).size)

  @property
  def num_cams(self) -> int:
    return int(np.unique(self.camids).size)


@dataclasses.dataclass(frozen=True)
class ReidDataset:
  """A re-ID data set: train (pids relabelled 0..num_train_pids-1), query and gallery
  (original ids, so that query/gallery matching is by the data set's own identity)."""

  name: str
  root: str
  train: Split
  query: Split
  gallery: Split
  num_train_pids: int
  num_cams: int  # max camid + 1 over all splits (camids index 0..num_cams-1)
  camera_names: tuple[str, ...] = ()  # camera id -> its folder name (unlabelled folders)
  skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of files that could not be read

  @property
  def num_train_images(self) -> int:
    return len(self.train)

  @property
  def labelled(self) -> bool:
    """Whether the training images carry identities (an unlabelled folder's do not)."""
    return bool(len(self.train)) and bool(np.all(self.train.pids >= 0))

  @property
  def has_test_split(self) -> bool:
    """Whether there are labelled query and gallery images to evaluate on."""
    return len(self.query) > 0 and len(self.gallery) > 0

  @property
  def num_train_cams(self) -> int:
    return self.train.num_cams

  @property
  def num_query_pids(self) -> int:
    return self.query.num_pids

  @property
  def num_query_images(self) -> int:
    return len(self.query)

  @property
  def num_gallery_pids(self) -> int:
    return self.gallery.num_pids

  @property
  def num_gallery_images(self) -> int:
    return len(self.gallery)

  def counts(self) -> dict:
    return dict(
        num_train_pids=self.num_train_pids,
        num_train_images=self.num_train_images,
        num_query_pids=self.num_query_pids,
        num_query_images=self.num_query_images,
        num_gallery_pids=self.num_gallery_pids,
        num_gallery_images=self.num_gallery_images,
        num_cams=self.num_cams,
    )

  def summary(self) -> str:
    c = self.counts()
    return (
        f"{self.name} ({self.root}): train {c['num_train_pids']} ids / "
        f"{c['num_train_images']} images; query {c['num_query_pids']} ids / "
        f"{c['num_query_images']} images; gallery {c['num_gallery_pids']} ids / "
        f"{c['num_gallery_images']} images; {c['num_cams']} cameras"
    )


def relabel(pids: np.ndarray) -> np.ndarray:
  """Map ids to 0..n-1 in sorted order of the original id (the reference's relabelling)."""
  _, inverse = np.unique(np.asarray(pids), return_inverse=True)
  return inverse.astype(np.int32).reshape(-1)


def make_dataset(name: str, root, train: Split, query: Split, gallery: Split) -> ReidDataset:
  """Assemble a ReidDataset: relabels train ids, derives the counts, logs them."""
  if len(train) == 0:
    raise DataError(f'{name}: no training images under {root}')
  train = Split(train.paths, relabel(train.pids), train.camids)
  cams = np.concatenate([train.camids, query.camids, gallery.camids])
  ds = ReidDataset(
      name=name,
      root=str(root),
      train=train,
      query=query,
      gallery=gallery,
      num_train_pids=int(train.pids.max()) + 1,
      num_cams=int(cams.max()) + 1,
  )
  log.info('loaded %s', ds.summary())
  expected = EXPECTED_COUNTS.get(name)
  if expected:
    got = ds.counts()
    diff = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    if diff:
      log.info(
          '%s counts differ from the published full set (got, published): %s -- '
          'fine for a partial or custom folder',
          name,
          diff,
      )
  return ds


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _child(parent: Path, name: str) -> Path | None:
  """parent/name if it exists, else a case-insensitive match (MSMT17_V2 folder names appear
  both as mask_train_v2 and mask_train_V2 in the wild), else None."""
  p = parent / name
  if p.exists():
    return p
  try:
    for entry in os.scandir(parent):
      if entry.name.lower() == name.lower():
        return parent / entry.name
  except OSError:
    pass
  return None


def resolve_root(
    root,
    required: Sequence[str],
    subdirs: Sequence[str],
    what: str,
    hint: Callable[[Path], str] | None = None,
) -> Path:
  """Find the folder holding all `required` entries: `root` itself or one of the usual
  sub-folder names of the download (e.g. Market-1501-v15.09.15). Raises DataError otherwise."""
  if root is None:
    raise DataError(f'{what}: no root folder given (pass root=... or set $JAXREID_DATA)')
  root = Path(root).expanduser()
  if not root.exists():
    raise DataError(f'{what}: root folder {root} does not exist')
  if not root.is_dir():
    raise DataError(f'{what}: root {root} is not a folder')
  for cand in [root, *(root / s for s in subdirs)]:
    if cand.is_dir() and all(_child(cand, r) is not None for r in required):
      return cand.resolve()
  missing = [r for r in required if _child(root, r) is None]
  extra = hint(root) if hint else ''
  raise DataError(
      f"{what}: {root} does not have the expected layout: it needs {', '.join(required)} "
      f"(missing: {', '.join(missing)}; also looked in sub-folders {', '.join(subdirs)})"
      + (f'. {extra}' if extra else '')
  )


def _list_images(folder: Path, what: str) -> list[str]:
  if not folder.is_dir():
    raise DataError(f'{what}: expected an image folder at {folder}')
  names = sorted(
      e.name
      for e in os.scandir(folder)
      if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
  )
  if not names:
    raise DataError(f"{what}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in {folder}")
  return names


# ---------------------------------------------------------------------------------------------
# Market-1501 layout (Market-1501, DukeMTMC-reID, any custom folder following it)
# ---------------------------------------------------------------------------------------------

MARKET_DIRS = ('bounding_box_train', 'query', 'bounding_box_test')
# '0002_c1s1_000451_03.jpg' (Market), '-1_c1s1_000401_03.jpg' (Market junk), '0001_c2_f0046182.jpg'
# (Duke). Only the leading "<pid>_c<cam>" is interpreted.
_MARKET_NAME = re.compile(r'^(-?\d+)_c(\d+)')


def read_market_folder(
    folder, *, keep_distractors: bool, max_cam: int | None = None, what: str = 'market1501'
) -> Split:
  """Read one Market-layout image folder.

  pid -1 (junk) is always dropped; pid 0 (distractor) is kept only if `keep_distractors`
  (the gallery). Camera numbers are 1-based in the names and stored 0-based.
  """
  folder = Path(folder)
  names = _list_images(folder, what)
  paths, pids, cams = [], [], []
  for n in names:
    m = _MARKET_NAME.match(n)
    if m is None:
      raise DataError(
          f'{what}: cannot parse file name {folder / n}: expected '
          f"'<pid>_c<camera>...', e.g. 0002_c1s1_000451_03.jpg"
      )
    pid, cam = int(m.group(1)), int(m.group(2))
    if pid < -1:
      raise DataError(f'{what}: invalid identity {pid} in {folder / n} (expected >= -1)')
    if cam < 1 or (max_cam is not None and cam > max_cam):
      raise DataError(
          f'{what}: camera {cam} out of range in {folder / n} '
          f"(expected 1..{max_cam if max_cam else 'N'})"
      )
    if pid == -1 or (pid == 0 and not keep_distractors):
      continue
    paths.append(str(folder / n))
    pids.append(pid)
    cams.append(cam - 1)
  return Split(np.array(paths, dtype=str), np.array(pids, np.int32), np.array(cams, np.int32))


def _read_market_layout(
    root, name: str, subdirs: Sequence[str], max_cam: int | None
) -> ReidDataset:
  base = resolve_root(root, MARKET_DIRS, subdirs, name)
  train = read_market_folder(
      base / 'bounding_box_train', keep_distractors=False, max_cam=max_cam, what=name
  )
  query = read_market_folder(base / 'query', keep_distractors=False, max_cam=max_cam, what=name)
  gallery = read_market_folder(
      base / 'bounding_box_test', keep_distractors=True, max_cam=max_cam, what=name
  )
  return make_dataset(name, base, train, query, gallery)


def read_market1501(root, *, name: str = 'market1501') -> ReidDataset:
  """Market-1501 or any folder in its layout (bounding_box_train/, query/, bounding_box_test/).

  No upper bound on the camera number, so custom sets in this layout read unchanged.
  """
  return _read_market_layout(root, name, MARKET_SUBDIRS, max_cam=None)


MARKET_SUBDIRS = ('Market-1501-v15.09.15', 'Market-1501', 'market1501')
DUKE_SUBDIRS = ('DukeMTMC-reID', 'dukemtmc-reid', 'dukemtmc')


def read_market_test_split(
    root,
    *,
    name: str = 'market1501_test',
    max_cam: int | None = None,
    subdirs: Sequence[str] = MARKET_SUBDIRS,
) -> ReidDataset:
  """Only the query/ and bounding_box_test/ folders of a Market-layout set: a labelled set to
  evaluate on (a validation set, an evaluation without training images); no training split."""
  base = resolve_root(root, MARKET_DIRS[1:], subdirs, name)
  query = read_market_folder(base / 'query', keep_distractors=False, max_cam=max_cam, what=name)
  gallery = read_market_folder(
      base / 'bounding_box_test', keep_distractors=True, max_cam=max_cam, what=name
  )
  cams = np.concatenate([query.camids, gallery.camids])
  return ReidDataset(name, str(base), Split.empty(), query, gallery, 0, int(cams.max()) + 1)


def read_dukemtmc(root, *, name: str = 'dukemtmc') -> ReidDataset:
  """DukeMTMC-reID: Market layout, cameras 1-8 (withdrawn by its authors; reading supported)."""
  return _read_market_layout(root, name, DUKE_SUBDIRS, max_cam=8)


# ---------------------------------------------------------------------------------------------
# MSMT17 (list files)
# ---------------------------------------------------------------------------------------------

MSMT_LISTS = ('list_train.txt', 'list_val.txt', 'list_query.txt', 'list_gallery.txt')


def _read_msmt_list(list_file: Path, image_dir: Path, what: str, verify_files: bool) -> Split:
  """Lines '0000/0000_000_01_0303morning_0015_0.jpg 0' -> (path, pid, camera = 3rd '_' field)."""
  paths, pids, cams = [], [], []
  with open(list_file, 'r', encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      parts = line.split()
      try:
        if len(parts) != 2:
          raise ValueError('expected 2 fields')
        rel, label = parts[0], int(parts[1])
        cam = int(os.path.basename(rel).split('_')[2])
      except (ValueError, IndexError):
        raise DataError(
            f'{what}: cannot parse line {lineno} of {list_file}: {line!r}; expected '
            f"'<pid folder>/<pid>_<n>_<camera>_..._.jpg <pid>', e.g. "
            f"'0000/0000_000_01_0303morning_0015_0.jpg 0'"
        ) from None
      if not 1 <= cam <= 15:
        raise DataError(
            f'{what}: camera {cam} out of range 1..15 at line {lineno} of ' f'{list_file}: {line!r}'
        )
      if label < 0:
        raise DataError(f'{what}: negative identity at line {lineno} of {list_file}')
      paths.append(str(image_dir / rel))
      pids.append(label)
      cams.append(cam - 1)
  if not paths:
    raise DataError(f'{what}: list file {list_file} has no entries')
  # Checking every file costs a stat per image (126k for MSMT17): by default check a spread
  # sample, which catches a wrong image folder or a V1/V2 mix-up; verify_files=True checks all.
  check = (
      paths
      if verify_files
      else [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, 50).astype(int))]
  )
  for p in check:
    if not os.path.isfile(p):
      raise DataError(f'{what}: image {p} listed in {list_file} does not exist')
  return Split(np.array(paths, dtype=str), np.array(pids, np.int32), np.array(cams, np.int32))


def _concat(a: Split, b: Split) -> Split:
  return Split(
      np.concatenate([a.paths, b.paths]),
      np.concatenate([a.pids, b.pids]),
      np.concatenate([a.camids, b.camids]),
  )


def _read_msmt(
    root,
    name: str,
    train_dir: str,
    test_dir: str,
    subdirs: Sequence[str],
    verify_files: bool,
    other: tuple[str, str, str],
) -> ReidDataset:
  def hint(r: Path) -> str:
    o_train, o_test, o_name = other
    for cand in [r, *(r / s for s in subdirs)]:
      if _child(cand, o_train) is not None and _child(cand, o_test) is not None:
        return (
            f'{cand} has {o_train}/ and {o_test}/, which is the layout of '
            f"'{o_name}': load it with that name"
        )
    return ''

  base = resolve_root(root, (train_dir, test_dir), subdirs, name, hint)
  missing = [n for n in MSMT_LISTS if not (base / n).is_file()]
  if missing:
    raise DataError(
        f"{name}: {base} lacks the list file(s) {', '.join(missing)}; MSMT17 needs "
        f"{', '.join(MSMT_LISTS)} next to {train_dir}/ and {test_dir}/ (they come with the "
        f'official download)'
    )
  tr, te = _child(base, train_dir), _child(base, test_dir)
  train = _concat(
      _read_msmt_list(base / 'list_train.txt', tr, name, verify_files),
      _read_msmt_list(base / 'list_val.txt', tr, name, verify_files),
  )
  query = _read_msmt_list(base / 'list_query.txt', te, name, verify_files)
  gallery = _read_msmt_list(base / 'list_gallery.txt', te, name, verify_files)
  return make_dataset(name, base, train, query, gallery)


def read_msmt17(root, *, verify_files: bool = False, name: str = 'msmt17') -> ReidDataset:
  """MSMT17 V1 (as MMT uses): train/, test/ and the four list files; train = train + val lists."""
  return _read_msmt(
      root,
      name,
      'train',
      'test',
      ('MSMT17_V1', 'MSMT17', 'msmt17'),
      verify_files,
      ('mask_train_v2', 'mask_test_v2', 'msmt17_v2'),
  )


def read_msmt17_v2(root, *, verify_files: bool = False, name: str = 'msmt17_v2') -> ReidDataset:
  """MSMT17 V2 (faces masked).

  Assumed layout (the convention of the public V2 readers, e.g. torchreid/fast-reid): the same as
  V1 with the image folders renamed `mask_train_v2/` and `mask_test_v2/` (matched
  case-insensitively, since `mask_train_V2` also occurs), the same four list file names in the
  root, the same `<pid folder>/<file>.jpg <pid>` lines, and the camera as the third `_` field of
  the file name.
  """
  return _read_msmt(
      root,
      name,
      'mask_train_v2',
      'mask_test_v2',
      ('MSMT17_V2', 'MSMT17', 'msmt17'),
      verify_files,
      ('train', 'test', 'msmt17'),
  )


# ---------------------------------------------------------------------------------------------
# An unlabelled folder of crops (a tracker's own cameras)
# ---------------------------------------------------------------------------------------------

ROOT_CAMERA = '.'  # the camera name of images lying directly in the root folder


def _unreadable(path: str) -> str | None:
  """Why `path` cannot be decoded as an RGB image (None: it can)."""
  try:
    with Image.open(path) as im:
      im.convert('RGB')  # the full decode: a truncated file fails here, not in training
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    return f'{type(e).__name__}: {e}'
  return None


def read_image_folder(root, *, name: str = 'folder', num_threads: int | None = None) -> ReidDataset:
  """Every image under `root`, recursively, without identities: the training set of an
  unlabelled target domain (no query / gallery: nothing can be evaluated without labels).

  Camera = the first-level sub-folder (`root/<camera>/.../x.jpg`); images directly in `root`
  are one camera of their own ('.'). Hidden files and folders are ignored. Unreadable or corrupt
  files are left out and listed in `skipped`; a folder with no readable image is a DataError.
  """
  if not root:
    raise DataError(
        f'{name}: no folder given: set config.data.target_root=DIR (your unlabelled crops, '
        'one sub-folder per camera)'
    )
  base = Path(root).expanduser()
  if not base.is_dir():
    raise DataError(f'{name}: {base} ' + ('is not a folder' if base.exists() else 'does not exist'))
  base = base.resolve()
  found = []
  for folder, dirs, files in os.walk(base, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    rel = Path(folder).relative_to(base)
    camera = rel.parts[0] if rel.parts else ROOT_CAMERA
    found += [
        (str(Path(folder) / f), camera)
        for f in sorted(files)
        if not f.startswith('.') and f.lower().endswith(FOLDER_EXTENSIONS)
    ]
  if not found:
    raise DataError(
        f"{name}: no images ({'/'.join(FOLDER_EXTENSIONS)}) under {base} (searched recursively)"
    )
  paths = [p for p, _ in found]
  with cf.ThreadPoolExecutor(num_threads or min(8, os.cpu_count() or 1)) as ex:
    reasons = list(ex.map(_unreadable, paths, chunksize=64))
  skipped = tuple((p, r) for p, r in zip(paths, reasons) if r is not None)
  kept = [(p, c) for (p, c), r in zip(found, reasons) if r is None]
  if not kept:
    first = ', '.join(os.path.relpath(p, base) for p, _ in skipped[:3])
    raise DataError(
        f'{name}: none of the {len(skipped)} image files under {base} can be read ({first}, ...)'
    )
  camera_names = tuple(sorted({c for _, c in kept}))
  camids = np.searchsorted(np.array(camera_names), np.array([c for _, c in kept]))
  train = Split(np.array([p for p, _ in kept]), np.full(len(kept), UNLABELLED), camids)
  return ReidDataset(
      name=name,
      root=str(base),
      train=train,
      query=Split.empty(),
      gallery=Split.empty(),
      num_train_pids=0,
      num_cams=len(camera_names),
      camera_names=camera_names,
      skipped=skipped,
  )


READERS: dict[str, Callable[..., ReidDataset]] = {
    'folder': read_image_folder,
    'market1501': read_market1501,
    'market1501_test': read_market_test_split,
    'dukemtmc': read_dukemtmc,
    'msmt17': read_msmt17,
    'msmt17_v2': read_msmt17_v2,
}
