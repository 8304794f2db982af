#!/usr/bin/env bash
# Domain adaptation between the two small real sets in ../shared/data:
#   cuhk03_detected -> pku_reid and pku_reid -> cuhk03_detected,
# source only, clustering baseline, mean-teacher baseline, MMT, ABMT, from the same source models.
# Usage: [RUNS_DIR=workdirs/real] [ONLY="abmt"] bash experiments/real_data.sh [cuhk2pku|pku2cuhk] [extra --config flags...]
#   ONLY: the adaptation methods to run (default all four; their source models are trained first).
# Results: $OUT/<task>/<method>/results.json, summarised by experiments/summarise.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
task=${1:-cuhk2pku}; shift || true
out=${RUNS_DIR:-workdirs/real}/$task
only=" ${ONLY:-cluster_baseline mean_teacher mmt abmt} "
common=(--config.model.depth=18 --config.model.width=16 "$@")

# Two source models (different seeds) for the resnet methods, one two-branch model for ABMT.
if [[ "$only" == *" cluster_baseline "* || "$only" == *" mean_teacher "* || "$only" == *" mmt "* ]]; then
  for seed in 1 2; do
    $PY -m jaxreid.main --config=configs/$task.py:pretrain --workdir=$out/pretrain_s$seed \
        --config.seed=$seed "${common[@]}"
  done
fi
if [[ "$only" == *" abmt "* ]]; then
  $PY -m jaxreid.main --config=configs/$task.py:pretrain,abmt --workdir=$out/pretrain_abmt \
      --config.seed=1 "${common[@]}"
fi

m1=$out/pretrain_s1/pretrain_seed1/model.msgpack
m2=$out/pretrain_s2/pretrain_seed2/model.msgpack
ma=$out/pretrain_abmt/pretrain_seed1/model.msgpack
for method in cluster_baseline mean_teacher mmt; do
  [[ "$only" == *" $method "* ]] || continue
  $PY -m jaxreid.main --config=configs/$task.py:$method --workdir=$out/$method \
      "--config.init.checkpoints=('$m1','$m2')" "${common[@]}"
done
if [[ "$only" == *" abmt "* ]]; then
  $PY -m jaxreid.main --config=configs/$task.py:abmt --workdir=$out/abmt \
      "--config.init.checkpoints=('$ma',)" "${common[@]}"
fi
$PY experiments/summarise.py $out
