#!/usr/bin/env bash
# The built-in synthetic world as a yardstick: every method on the default world (configs/*.py),
# seeds 1-3, compared with jaxreid-compare against MMT (the default); MMT on two more worlds
# (the data seed); then the evaluation-size and clustering noise of the MMT runs. Every run
# compiles from scratch (--compilation_cache=), so each wall time includes compilation as a fresh
# clone's does. Results: experiments/results_synthetic.md.
# Cost on the 2-core CPU: about 5 to 6 minutes per run (17 runs), 1 to 2 hours in all.
# Usage: bash experiments/synthetic_yardstick.sh [OUT]        (default OUT: runs/yardstick)
# Resumable: rerunning skips the finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${1:-runs/yardstick}
compare() { $PY -m jaxreid.tools.compare --args='--compilation_cache=' "$@"; }
# The two methods of the acceptance first, then the baselines (the finished runs are skipped).
methods=(--variant='mmt=--config=configs/mmt.py' --variant='abmt=--config=configs/abmt.py')
compare --seeds=3 --out="$out" "${methods[@]}"
compare --seeds=3 --out="$out" "${methods[@]}" \
  --variant='mmt_dbscan=--config=configs/mmt.py:dbscan' \
  --variant='mean_teacher=--config=configs/mean_teacher.py' \
  --variant='cluster_baseline=--config=configs/cluster_baseline.py'
# The data seed: MMT (seed 1) on worlds 1 and 2 (world 0, the default, is mmt/seed1 above).
compare --seeds=1 --out="$out/worlds" --config=configs/mmt.py \
  --variant='world1=--config.data.synthetic.seed=1' \
  --variant='world2=--config.data.synthetic.seed=2'
$PY experiments/synthetic_variance.py --runs="$out/mmt" --out="$out/variance.json"
