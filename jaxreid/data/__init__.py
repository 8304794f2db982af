"""Data sets: one entry point, `load_dataset`, for real folders and the built-in synthetic world.

Real sets are read from the user's folder (never written to). Synthetic sets are generated once
into a cache folder and then read with the Market-1501 reader, so both go through the same code.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxreid.data import synthetic
from jaxreid.data.readers import READERS
from jaxreid.data.readers import DataError
from jaxreid.data.readers import ReidDataset
from jaxreid.data.readers import Split
from jaxreid.data.readers import make_dataset
from jaxreid.data.readers import read_dukemtmc
from jaxreid.data.readers import read_image_folder
from jaxreid.data.readers import read_market1501
from jaxreid.data.readers import read_msmt17
from jaxreid.data.readers import read_msmt17_v2
from jaxreid.data.readers import relabel

__all__ = [
    'DataError',
    'ReidDataset',
    'Split',
    'load_dataset',
    'names',
    'make_dataset',
    'relabel',
    'read_market1501',
    'read_dukemtmc',
    'read_image_folder',
    'read_msmt17',
    'read_msmt17_v2',
]

_SYNTHETIC = {'synthetic_a': 'a', 'synthetic_b': 'b', 'synthetic': None}


def names() -> tuple[str, ...]:
  return (*READERS, *_SYNTHETIC)


def load_dataset(name: str, root=None, **kwargs) -> ReidDataset:
  """Load a data set by name.

  name: 'market1501' (any folder in the Market layout), 'dukemtmc', 'msmt17', 'msmt17_v2',
    'folder' (unlabelled images, recursively, one camera per first-level sub-folder),
    'synthetic_a', 'synthetic_b', or 'synthetic' with domain='a'|'b'.
  root: the data set folder. For real sets, None means $JAXREID_DATA/<name>. For synthetic sets
    it is the world folder (default: $JAXREID_DATA_CACHE/synthetic/seed{seed}, where
    $JAXREID_DATA_CACHE defaults to ~/.cache/jaxreid); it is generated there on first use.
  kwargs: passed to the reader (e.g. verify_files=True for MSMT17; seed=, domain= and
    generator settings for synthetic sets).
  """
  key = name.lower()
  if key in _SYNTHETIC:
    domain = kwargs.pop('domain', _SYNTHETIC[key])
    if _SYNTHETIC[key] is not None and domain != _SYNTHETIC[key]:
      raise DataError(f'{name} is domain {_SYNTHETIC[key]!r}, got domain={domain!r}')
    if domain not in ('a', 'b'):
      raise DataError(f"synthetic data set needs domain='a' or 'b', got {domain!r}")
    return synthetic.load_synthetic(domain, root=root, **kwargs)
  if key not in READERS:
    raise DataError(f"unknown data set {name!r}; known: {', '.join(names())}")
  if root is None and key != 'folder' and os.environ.get('JAXREID_DATA'):
    root = Path(os.environ['JAXREID_DATA']).expanduser() / key
  return READERS[key](root, **kwargs)
