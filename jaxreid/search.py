"""Searching a folder of person crops for the people in query images, with a trained model.

`search(loaded, query_path, gallery_path)` reads both image sets and extracts their features with
a loaded model (`inference.load_model`) through `jaxreid.FeatureExtractor` (any size and mode,
resized as in training by default; unreadable files skipped and reported), then ranks the gallery
for every query (`rank_gallery`: squared Euclidean distance between unit features, exact float64
on the host). `ranking_text` prints the ranked lists and `export` writes features and rankings.
When all file names follow the Market-1501 convention `<pid>_c<camera>...`, matches are known by
identity (`SearchResult.is_match`). The command line is `jaxreid-search` (`jaxreid.tools.search`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxreid import extractor as extractor_lib
from jaxreid import inference
from jaxreid.retrieval import distances


@dataclasses.dataclass
class SearchResult:
  """Everything a search produced, aligned with the readable images (skipped ones dropped)."""

  query: inference.ImageSet
  gallery: inference.ImageSet
  query_features: np.ndarray  # (Q, D) unit rows
  gallery_features: np.ndarray  # (G, D)
  ranked: np.ndarray  # (Q, k) gallery indices, best first
  distances: np.ndarray  # (Q, k) squared Euclidean distances
  query_ids: list | None  # [(pid, camid)] from Market-style names, None if not all parse
  gallery_ids: list | None

  @property
  def is_match(self) -> np.ndarray | None:
    """(Q, k) same identity (junk pid -1 never matches); None when identities are unknown."""
    if self.query_ids is None or self.gallery_ids is None:
      return None
    q = np.array([p for p, _ in self.query_ids])
    g = np.array([p for p, _ in self.gallery_ids])
    return (g[self.ranked] == q[:, None]) & (q[:, None] != -1)

  @property
  def skipped(self) -> list[tuple[str, str]]:
    return self.query.skipped + self.gallery.skipped


def _ids(paths):
  parsed = [inference.parse_market_name(p) for p in paths]
  return None if any(p is None for p in parsed) else parsed


def rank_gallery(
    qf: np.ndarray, gf: np.ndarray, k: int, block: int = 256
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery indices (Q, k) by squared Euclidean distance and those distances.

  Computed in float64 on the host, blocked over queries (memory: block x G): a search has few
  queries, and the printed values stay exact (an accelerator's float32 matmul may use TF32, whose
  ~1e-3 error would show as a non-zero distance between identical images). Ties keep gallery
  order.
  """
  g = np.asarray(gf, np.float64)
  g_sq = (g * g).sum(1)
  k = min(int(k), len(g))
  ranked = np.empty((len(qf), k), np.int64)
  dists = np.empty((len(qf), k), np.float64)
  for s in range(0, len(qf), block):
    q = np.asarray(qf[s : s + block], np.float64)
    d = np.maximum(distances.sqdist_from_dot(q @ g.T, (q * q).sum(1)[:, None], g_sq[None, :]), 0.0)
    ranked[s : s + block], dists[s : s + block] = extractor_lib.top_k_rows(d, k)
  return ranked, dists


def read_images(extractor: extractor_lib.FeatureExtractor, path: str, what: str):
  """A file or a folder's images, decoded by `extractor` at its size (unreadable ones skipped);
  fails clearly when nothing readable is left."""
  result = extractor.load_images(inference.list_images(path, what))
  if len(result) == 0:
    names = ', '.join(os.path.basename(p) for p, _ in result.skipped[:5])
    raise inference.InferenceError(
        f'{what}: none of the {len(result.skipped)} file(s) in {path} could be '
        f'read as an image ({names})'
    )
  return result


def search(
    loaded: inference.LoadedModel,
    query_path: str,
    gallery_path: str,
    *,
    topk: int = 10,
    batch_size: int = 256,
    interpolation: str = 'bicubic',
) -> SearchResult:
  """Reads both image sets, extracts features (one call, so one compiled batch shape) and ranks
  the gallery for every query by squared Euclidean distance (ties: gallery order).

  interpolation: the resize to the model's size; 'bicubic' as in training (the default),
  'bilinear' as torchreid's feature extractor."""
  extractor = extractor_lib.FeatureExtractor(loaded, batch_size, interpolation=interpolation)
  query = read_images(extractor, query_path, '--query')
  gallery = read_images(extractor, gallery_path, '--gallery')
  feats = extractor.embed(np.concatenate([query.images, gallery.images]))
  qf, gf = feats[: len(query)], feats[len(query) :]
  ranked, dists = rank_gallery(qf, gf, topk)
  return SearchResult(query, gallery, qf, gf, ranked, dists, _ids(query.paths), _ids(gallery.paths))


def ranking_text(result: SearchResult) -> str:
  """Per query: a header line, then `rank distance match file` lines."""
  match = result.is_match
  lines = []
  for i, qpath in enumerate(result.query.paths):
    pid = f' (identity {result.query_ids[i][0]})' if result.query_ids else ''
    lines.append(f'query {i + 1}/{len(result.query)}: {os.path.basename(qpath)}{pid}')
    lines.append(f'  {"rank":>4}  {"distance":>8}  {"match":>5}  gallery image')
    for j, g in enumerate(result.ranked[i]):
      m = '-' if match is None else ('yes' if match[i, j] else 'no')
      lines.append(
          f'  {j + 1:>4d}  {result.distances[i, j]:8.4f}  {m:>5}  '
          f'{os.path.basename(result.gallery.paths[g])}'
      )
  return '\n'.join(lines)


def export(result: SearchResult, out_dir: str, model_path: str) -> list[str]:
  """Features + paths / ids (as `jaxreid-evaluate`) and `ranking.json` with the top-k lists."""

  def split(images, feats, ids):
    return dict(
        features=feats,
        paths=[os.path.abspath(p) for p in images.paths],
        pids=None if ids is None else [p for p, _ in ids],
        camids=None if ids is None else [c for _, c in ids],
    )

  written = inference.export_features(
      out_dir,
      {
          'query': split(result.query, result.query_features, result.query_ids),
          'gallery': split(result.gallery, result.gallery_features, result.gallery_ids),
      },
      {'model': os.path.abspath(model_path)},
  )
  match = result.is_match
  ranking = [
      {
          'query': os.path.abspath(q),
          'matches': [
              {
                  'rank': j + 1,
                  'gallery': os.path.abspath(result.gallery.paths[g]),
                  'gallery_index': int(g),
                  'distance': float(result.distances[i, j]),
                  'match': None if match is None else bool(match[i, j]),
              }
              for j, g in enumerate(result.ranked[i])
          ],
      }
      for i, q in enumerate(result.query.paths)
  ]
  path = os.path.join(out_dir, 'ranking.json')
  with open(path, 'w') as f:
    json.dump(
        {'skipped': [{'path': p, 'reason': r} for p, r in result.skipped], 'queries': ranking},
        f,
        indent=1,
    )
  return written + [path]
