#!/usr/bin/env bash
# The built-in synthetic world as a yardstick: every method on the default world (configs/*.py),
# seeds 1-3, compared with jaxreid-compare against MMT (the default); then the evaluation-size
# and clustering noise of the MMT runs. Results: experiments/results_synthetic.md.
# Cost on the 2-core CPU: about 6 minutes per run (15 runs).
# Usage: bash experiments/synthetic_yardstick.sh [OUT]        (default OUT: runs/yardstick)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${1:-runs/yardstick}
$PY -m jaxreid.tools.compare --seeds=3 --out="$out" \
  --variant='mmt=--config=configs/mmt.py' \
  --variant='abmt=--config=configs/abmt.py' \
  --variant='mmt_dbscan=--config=configs/mmt.py:dbscan' \
  --variant='mean_teacher=--config=configs/mean_teacher.py' \
  --variant='cluster_baseline=--config=configs/cluster_baseline.py'
$PY experiments/synthetic_variance.py --runs="$out/mmt" --out="$out/variance.json"
