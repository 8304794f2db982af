"""The one way a model is scored: `Evaluator`, the Market-1501 protocol on a labelled test set.

An evaluator holds a test set (query and gallery splits; a run's also their images, decoded once)
and turns features into the protocol's mAP and CMC rank-k (`jaxreid.retrieval.market_metrics`:
a gallery image of the query's identity *and* camera is not a match, docs/reference.md section
5). The training loop runs it on networks' variables (`run`), the `jaxreid-evaluate` command on a
loaded model, reading the images from their files (`run_model`); both give the same numbers for
the same network, since both resize as training decodes (bicubic).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable
from typing import Sequence

import numpy as np

from jaxreid import features as features_lib
from jaxreid import inference
from jaxreid import retrieval
from jaxreid.data import DataError
from jaxreid.data import Split
from jaxreid.data import load_dataset
from jaxreid.data import readers
from jaxreid.extractor import FeatureExtractor
from jaxreid.input_pipeline import DecodedSet

# Market-layout sets whose test splits can be read without their training folder.
_TEST_SPLITS_ONLY = {
    'market1501': (None, readers.MARKET_SUBDIRS),
    'dukemtmc': (8, readers.DUKE_SUBDIRS),
}


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Retrieval metrics of one labelled test set: `images` are the query then gallery images
  decoded at the network's input size (a run's; None when the files are read by `run_model`)."""

  name: str
  query: Split
  gallery: Split
  images: np.ndarray | None = None
  rerank: bool = False

  @classmethod
  def of_decoded(cls, decoded: DecodedSet, *, rerank: bool = False) -> Evaluator:
    """A run's test set, its images decoded once (`input_pipeline.load_and_decode`)."""
    ds = decoded.dataset
    return cls(ds.name, ds.query, ds.gallery, decoded.test_images, rerank)

  @classmethod
  def load(
      cls, name: str, root: str | None, config: dict | None = None, *, rerank: bool = False
  ) -> Evaluator:
    """A data set's test splits by name (`jaxreid.data.load_dataset`); a Market-layout folder
    needs only query/ and bounding_box_test/. Synthetic worlds use the run's generator settings
    when `config` (a run's config.json) has them."""
    kwargs = {}
    if name.startswith('synthetic') and config and (config.get('data') or {}).get('synthetic'):
      kwargs = dict(config['data']['synthetic'])
    try:
      ds = load_dataset(name, root or None, **kwargs)
      where = ds.root
    except DataError:
      if name.lower() not in _TEST_SPLITS_ONLY or not root:
        raise
      max_cam, subdirs = _TEST_SPLITS_ONLY[name.lower()]
      ds = readers.read_market_test_split(root, name=name, max_cam=max_cam, subdirs=subdirs)
      where = f'{ds.root}, test splits only'
    if not ds.has_test_split:
      raise DataError(
          f'{name} ({ds.root}): {len(ds.query)} query and {len(ds.gallery)} gallery images; '
          'both are needed'
      )
    return cls(f'{name} ({where})', ds.query, ds.gallery, rerank=rerank)

  def metrics(self, query_features: np.ndarray, gallery_features: np.ndarray) -> dict:
    """mAP, top-1/5/10 (percent) and query counts of features in query / gallery order."""
    q, g = self.query, self.gallery
    return retrieval.market_metrics(
        query_features,
        gallery_features,
        q.pids,
        g.pids,
        q.camids,
        g.camids,
        rerank=self.rerank,
    )

  def run(
      self,
      embed_fn: Callable,
      variable_sets: Sequence[dict],
      *,
      batch_size: int,
      branches: bool = False,
  ) -> dict:
    """The metrics of the networks' eval features (`features.extract_features`: averaged over
    `variable_sets`) on the decoded images. `branches` (ABMTNet): also each branch alone, from the
    halves of the same features, as 'avg/mAP', 'avg/top1', 'max/mAP', 'max/top1'."""
    feats = features_lib.extract_features(
        embed_fn, variable_sets, self.images, batch_size, label='[evaluate] query + gallery'
    )
    nq = len(self.query)
    results = self.metrics(feats[:nq], feats[nq:])
    if branches:
      for name, half in zip(('avg', 'max'), features_lib.branch_features(feats)):
        res = self.metrics(half[:nq], half[nq:])
        results.update({f'{name}/mAP': res['mAP'], f'{name}/top1': res['top1']})
    return results

  def run_model(
      self, loaded: inference.LoadedModel, *, batch_size: int = 256, interpolation='bicubic'
  ) -> tuple[dict, np.ndarray, np.ndarray, Evaluator]:
    """A loaded model on the image files: (metrics, query features, gallery features, the
    evaluator of the images that could be read). Unreadable images are left out of both splits
    with one line on stderr naming the first few: a damaged file should not cost the whole
    evaluation. The resize is training's ('bicubic'; 'bilinear' is torchreid's)."""
    extractor = FeatureExtractor(loaded, batch_size, interpolation=interpolation)
    out = extractor.extract_paths([*self.query.paths, *self.gallery.paths])
    kept = self
    if out.skipped:
      bad = {p for p, _ in out.skipped}
      names = ', '.join(os.path.basename(p) for p, _ in out.skipped[:5])
      print(
          f'warning: skipped {len(out.skipped)} unreadable image(s) of '
          f'{len(self.query) + len(self.gallery)}: {names}{", ..." if len(bad) > 5 else ""}',
          file=sys.stderr,
          flush=True,
      )
      kept = dataclasses.replace(
          self, query=_without(self.query, bad), gallery=_without(self.gallery, bad)
      )
      if len(kept.query) == 0 or len(kept.gallery) == 0:
        raise inference.InferenceError(
            f'no readable {"query" if len(kept.query) == 0 else "gallery"} image left '
            f'({len(out.skipped)} unreadable, e.g. {out.skipped[0][0]}: {out.skipped[0][1]})'
        )
    nq = len(kept.query)
    qf, gf = out.features[:nq], out.features[nq:]
    return kept.metrics(qf, gf), qf, gf, kept


def _without(split: Split, paths: set) -> Split:
  keep = np.array([p not in paths for p in split.paths], bool)
  return Split(split.paths[keep], split.pids[keep], split.camids[keep])
