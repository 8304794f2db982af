"""Benchmarks for jaxreid.retrieval / jaxreid.pseudo_labels (time and peak memory).

Every case runs in a fresh subprocess, so the reported peak RSS (``resource.getrusage`` max RSS
of that process, which includes the Python + JAX runtime and the generated features) belongs to
that case alone. Cases:

  jaccard   jaccard_distance + estimate_eps + DBSCAN at N = 12,936 / 32,621 (d = 2048), on unit
            features with identity structure (~700 noisy clusters) or random unit features (the
            worst case for sparsity: k-reciprocal sets barely overlap, so V spreads).
  rerank    test-time re-ranking, query x gallery (1,400 x 5,220; MSMT17: 11,659 x 82,161).
  evaluate  Market-size evaluation (3,368 x 15,913, d = 2048) including the distances.

Usage:
  python experiments/benchmarks/bench_retrieval.py            # the standard set (not MSMT17 rerank)
  python experiments/benchmarks/bench_retrieval.py jaccard --n 12936 --kind random
  python experiments/benchmarks/bench_retrieval.py rerank --q 11659 --g 82161
  python experiments/benchmarks/bench_retrieval.py evaluate
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB -> GiB


def cpu_s() -> float:
  """User + system CPU time of this process (all threads): less sensitive to other load."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def warm_up():
  """Import sklearn's clustering / JAX once, so one-off import time is not timed."""
  import jax.numpy as jnp
  import sklearn.cluster  # noqa: F401
  import sklearn.metrics  # noqa: F401

  jnp.zeros(1).block_until_ready()


def calibrate_gflops() -> float:
  """float32 matmul throughput right now (2048^3, JAX): how much of the shared CPU we get."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(3):
    f(a).block_until_ready()
  return 3 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9


def identity_features(rng, n, d, n_ids, sigma=3.0):
  """Unit features: a unit centre per identity plus isotropic noise of norm ~sigma."""
  centres = rng.standard_normal((n_ids, d)).astype(np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  ids = rng.integers(0, n_ids, n)
  x = centres[ids]
  x += (sigma / np.sqrt(d)) * rng.standard_normal((n, d)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x, ids


def random_features(rng, n, d):
  x = rng.standard_normal((n, d)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def case_jaccard(args):
  from jaxreid import pseudo_labels
  from jaxreid import retrieval

  rng = np.random.default_rng(0)
  if args.kind == 'random':
    x, ids = random_features(rng, args.n, args.d), None
  else:
    x, ids = identity_features(rng, args.n, args.d, args.ids)
  warm_up()
  base = peak_rss_gb()
  c0 = cpu_s()
  t0 = time.perf_counter()
  graph = retrieval.jaccard_distance(x, k1=20, k2=6)
  t1 = time.perf_counter()
  eps = pseudo_labels.estimate_eps(graph, args.rho)
  t2 = time.perf_counter()
  labels = pseudo_labels.dbscan(graph, eps, min_samples=4)
  t3 = time.perf_counter()
  c3 = cpu_s()
  stats = pseudo_labels.cluster_stats(labels, ids)
  return {
      'case': f'jaccard+dbscan N={args.n} {args.kind}',
      'n': args.n,
      'kind': args.kind,
      'jaccard_s': t1 - t0,
      'eps_s': t2 - t1,
      'dbscan_s': t3 - t2,
      'total_s': t3 - t0,
      'cpu_s': c3 - c0,
      'stored_pairs': int(graph.matrix.nnz),
      'per_row': graph.matrix.nnz / args.n,
      'eps': eps,
      'num_clusters': stats['num_clusters'],
      'noise_fraction': stats['noise_fraction'],
      'ari': stats.get('ari'),
      'rss_before_gb': base,
      'peak_rss_gb': peak_rss_gb(),
  }


def case_rerank(args):
  from jaxreid import retrieval

  rng = np.random.default_rng(0)
  n = args.q + args.g
  x, _ = identity_features(rng, n, args.d, max(2, n // 12))
  q, g = x[: args.q], x[args.q :]
  del x
  warm_up()
  base = peak_rss_gb()
  runs = []
  for _ in range(max(1, args.repeat if n < 20000 else 1)):  # first run includes compilation
    c0 = cpu_s()
    t0 = time.perf_counter()
    out = retrieval.rerank(q, g, k1=20, k2=6, lam=0.3)
    runs.append((time.perf_counter() - t0, cpu_s() - c0))
  return {
      'case': f'rerank {args.q}x{args.g}',
      'total_s': runs[0][0],
      'cpu_s': runs[0][1],
      'warm_total_s': min(r[0] for r in runs[1:]) if len(runs) > 1 else None,
      'shape': list(out.shape),
      'output_gb': out.nbytes / 1024**3,
      'rss_before_gb': base,
      'peak_rss_gb': peak_rss_gb(),
  }


def case_evaluate(args):
  from jaxreid import retrieval

  rng = np.random.default_rng(0)
  n_ids = 750
  qn, gn, n_distr = args.q, args.g, args.g * 2798 // 15913
  centres = rng.standard_normal((n_ids + 1, args.d)).astype(np.float32)
  q_pids = rng.integers(1, n_ids + 1, qn)
  g_pids = np.concatenate([rng.integers(1, n_ids + 1, gn - n_distr), np.zeros(n_distr, int)])
  q_cams, g_cams = rng.integers(0, 6, qn), rng.integers(0, 6, gn)

  def feats(pids):
    f = centres[pids] + 5.0 * rng.standard_normal((pids.size, args.d)).astype(np.float32)
    f[pids == 0] = rng.standard_normal((int((pids == 0).sum()), args.d))
    return f / np.linalg.norm(f, axis=1, keepdims=True)

  qf, gf = feats(q_pids), feats(g_pids)
  # warm-up (compilation) on a small slice, then time the full evaluation
  retrieval.market_metrics(qf[:64], gf, q_pids[:64], g_pids, q_cams[:64], g_cams)
  base = peak_rss_gb()
  times, cpus = [], []
  for _ in range(args.repeat):
    c0 = cpu_s()
    t0 = time.perf_counter()
    res = retrieval.market_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams)
    times.append(time.perf_counter() - t0)
    cpus.append(cpu_s() - c0)
  dist = retrieval.squared_distance(qf, gf)
  t_dist = []
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    retrieval.squared_distance(qf, gf)
    t_dist.append(time.perf_counter() - t0)
  t_proto = []
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    res2 = retrieval.market_metrics_from_distances(dist, q_pids, g_pids, q_cams, g_cams)
    t_proto.append(time.perf_counter() - t0)
  assert abs(res2['mAP'] - res['mAP']) < 1e-6
  return {
      'case': f'evaluate {qn}x{gn} d={args.d}',
      'evaluate_s': min(times),
      'evaluate_all_s': times,
      'evaluate_cpu_s': min(cpus),
      'distances_only_s': min(t_dist),
      'protocol_only_s': min(t_proto),
      'mAP': res['mAP'],
      'top1': res['top1'],
      'rss_before_gb': base,
      'peak_rss_gb': peak_rss_gb(),
  }


STANDARD = [
    ['jaccard', '--n', '12936', '--kind', 'clustered'],
    ['jaccard', '--n', '12936', '--kind', 'random'],
    ['jaccard', '--n', '32621', '--kind', 'clustered'],
    ['jaccard', '--n', '32621', '--kind', 'random'],
    ['rerank', '--q', '1400', '--g', '5220'],
    ['evaluate'],
]


def main():
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument('case', nargs='?', choices=['jaccard', 'rerank', 'evaluate'])
  ap.add_argument('--n', type=int, default=12936)
  ap.add_argument('--d', type=int, default=2048)
  ap.add_argument('--ids', type=int, default=700)
  ap.add_argument('--kind', choices=['clustered', 'random'], default='clustered')
  ap.add_argument('--rho', type=float, default=1.6e-3)
  ap.add_argument('--q', type=int, default=3368)
  ap.add_argument('--g', type=int, default=15913)
  ap.add_argument('--repeat', type=int, default=2)
  args = ap.parse_args()
  if args.case is None:  # the standard set, one fresh subprocess per case
    for extra in STANDARD:
      cmd = [sys.executable, os.path.abspath(__file__)] + extra
      print('$', ' '.join(cmd[1:]), flush=True)
      subprocess.run(cmd, check=True, cwd=ROOT)
    return
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  fn = {'jaccard': case_jaccard, 'rerank': case_rerank, 'evaluate': case_evaluate}[args.case]
  gflops_before = calibrate_gflops()
  res = fn(args)
  res['matmul_gflops_before_after'] = [round(gflops_before, 1), round(calibrate_gflops(), 1)]
  res['loadavg_after'] = os.getloadavg()
  print('RESULT ' + json.dumps(res), flush=True)


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  main()
