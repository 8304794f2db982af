#!/usr/bin/env bash
# Real adaptation from a published re-ID model (docs/reference.md section 9): torchreid's OSNet
# x0.25 trained on MSMT17 adapted to Market-1501 without its labels (task msmt2market), or the
# Market-1501 model adapted to CUHK03 (market2cuhk). Every row starts from the same weights in
# ../shared/weights; the source images are not used (ABMT clusters without source mixing on
# msmt2market: no MSMT17 images here).
#
# Usage: [RUNS_DIR=runs/real] [SEEDS="1 2"] [ONLY="mmt abmt"] [PARALLEL=0] \
#          bash experiments/real_adaptation.sh [msmt2market|market2cuhk] [extra --config flags...]
# Rows: cluster_baseline, mean_teacher, mmt (K-means 500 / 600), mmt_dbscan, abmt; each run's
# first line is the direct transfer (source only) of the published model. Default budget: the
# task preset's 3 epochs x 100 iterations of batch 32 at 256x128, evaluated at the end
# (experiments/results_real.md has the wall times on the 2-core CPU).
# Results: $RUNS_DIR/<task>/<row>_s<seed>/results.json; table: experiments/summarise.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/launch.sh
PY=${PYTHON:-.venv/bin/python}
task=${1:-msmt2market}; shift || true
out=${RUNS_DIR:-runs/real}/$task
mkdir -p "$out"
only=" ${ONLY:-mmt abmt cluster_baseline mean_teacher mmt_dbscan} "
for seed in ${SEEDS:-1 2}; do
  for row in mmt abmt cluster_baseline mean_teacher mmt_dbscan; do
    [[ "$only" == *" $row "* ]] || continue
    case $row in
      mmt_dbscan) config=configs/$task.py:mmt,dbscan ;;
      *) config=configs/$task.py:$row ;;
    esac
    [[ -f $out/${row}_s$seed/results.json ]] && continue  # finished already
    launch "${row}_s$seed" "$out" $PY -m jaxreid.main --config=$config \
        --workdir=$out/${row}_s$seed --config.seed=$seed "$@"
  done
done
wait_all
$PY experiments/summarise.py "$out"
