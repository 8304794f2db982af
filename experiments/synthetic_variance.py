"""What makes one synthetic result differ from the next: evaluation size and clustering, measured
on finished runs of the built-in world (the training-seed, pre-training-seed and world-seed
spreads come from the runs themselves: experiments/synthetic_yardstick.sh).

  python experiments/synthetic_variance.py --runs=runs/yardstick/mmt [--out=variance.json]

`--runs` is a folder of finished runs, one `seed<S>/` work dir each (jaxreid-compare's layout).
For each run it prints
- evaluation noise: the standard deviation of the adapted model's mAP over bootstrap resamples
  of the query set (per-query AP recomputed here in numpy), at the test split's full size and at
  126 queries (the world's earlier test size), i.e. how far a test set of that size alone moves
  a score;
- clustering noise: purity / NMI of K-means (the run's k) on the target training features of
  the run's first source model, for five K-means seeds, next to the spread across the runs'
  source models (pre-training seeds).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from jaxreid import inference
from jaxreid.data import load_dataset
from jaxreid.evaluator import Evaluator
from jaxreid.extractor import FeatureExtractor
from jaxreid.pseudo_labels import stats
from jaxreid.pseudo_labels.kmeans import kmeans

OLD_QUERIES = 126
BOOTSTRAP = 2000


def per_query_ap(qf, gf, q_pids, g_pids, q_cams, g_cams) -> np.ndarray:
  """Market-1501 protocol AP of every query (same identity in the same camera left out);
  queries without a valid match get NaN."""
  dist = -qf @ gf.T  # unit features: the order of the Euclidean distance
  aps = np.full(len(qf), np.nan)
  for i in range(len(qf)):
    keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
    order = np.argsort(dist[i, keep], kind='stable')
    hits = g_pids[keep][order] == q_pids[i]
    if hits.any():
      ranks = np.flatnonzero(hits) + 1
      aps[i] = np.mean(np.arange(1, len(ranks) + 1) / ranks)
  return aps


def bootstrap_std(values: np.ndarray, size: int, rng: np.random.Generator) -> float:
  """Std of the mean of `size` values drawn from `values` (with replacement), in the units of
  `values`."""
  means = rng.choice(values, (BOOTSTRAP, size), replace=True).mean(1)
  return float(means.std(ddof=1))


def evaluation_noise(workdir: str, config: dict, rng) -> dict:
  ev = Evaluator.load(config['data']['target'], None, config)
  metrics, qf, gf, kept = ev.run_model(inference.load_model(workdir))
  aps = 100 * per_query_ap(
      qf, gf, kept.query.pids, kept.gallery.pids, kept.query.camids, kept.gallery.camids
  )
  aps = aps[~np.isnan(aps)]
  return dict(
      mAP=metrics['mAP'],
      mAP_recomputed=float(aps.mean()),
      num_queries=len(aps),
      std_full=bootstrap_std(aps, len(aps), rng),
      std_126=bootstrap_std(aps, OLD_QUERIES, rng),
  )


def clustering_noise(workdir: str, config: dict, seeds=range(5)) -> dict:
  """K-means purity / NMI of the first source model's target training features, per K-means
  seed."""
  source = sorted(glob.glob(os.path.join(workdir, 'pretrain_seed*')))[0]
  ds = load_dataset(config['data']['target'], None, **config['data']['synthetic'])
  loaded = inference.load_model(
      os.path.join(source, 'model.msgpack'),
      overrides=dict(height=config['data']['height'], img_width=config['data']['width']),
  )
  feats = FeatureExtractor(loaded, 256, interpolation='bicubic')(list(ds.train.paths))
  k = config['cluster']['num_clusters']
  out = []
  for s in seeds:
    labels, _ = kmeans(feats, k, seed=s)
    st = stats.cluster_stats(labels, ds.train.pids)
    out.append((st['purity'], st['nmi']))
  p, n = np.array(out).T
  return dict(source_model=os.path.basename(source), purity=p.tolist(), nmi=n.tolist())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', required=True, help='folder of seed<S>/ work dirs')
  parser.add_argument('--out', default='', help='also write the figures as JSON here')
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  report = {}
  for workdir in sorted(glob.glob(os.path.join(args.runs, 'seed*'))):
    if not os.path.exists(os.path.join(workdir, 'results.json')):
      continue
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    name = os.path.basename(workdir)
    ev = evaluation_noise(workdir, config, rng)
    cl = clustering_noise(workdir, config)
    report[name] = dict(evaluation=ev, clustering=cl)
    print(
        f'{name}: adapted mAP {ev["mAP"]:.1f} (recomputed {ev["mAP_recomputed"]:.1f}) over '
        f'{ev["num_queries"]} queries; bootstrap std {ev["std_full"]:.2f} at that size, '
        f'{ev["std_126"]:.2f} at {OLD_QUERIES} queries | K-means on {cl["source_model"]}: purity '
        f'{min(cl["purity"]):.3f}-{max(cl["purity"]):.3f}, NMI {min(cl["nmi"]):.3f}-'
        f'{max(cl["nmi"]):.3f} over {len(cl["purity"])} K-means seeds',
        flush=True,
    )
  if len(report) > 1:
    first = [r['clustering']['purity'][0] for r in report.values()]
    print(
        f"K-means seed 0 purity across the runs' source models: {min(first):.3f}-{max(first):.3f}"
    )
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  main()
