#!/usr/bin/env bash
# Domain adaptation between the two small real sets in ../shared/data, on CPU:
#   cuhk03_detected -> pku_reid and pku_reid -> cuhk03_detected,
# source only, clustering baseline, mean-teacher baseline, MMT, ABMT, from the same source models.
# Usage: bash experiments/real_data.sh [cuhk2pku|pku2cuhk] [extra --config flags...]
# Results: workdirs/real/<task>/<method>/results.json, summarised by experiments/summarise.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
task=${1:-cuhk2pku}; shift || true
out=workdirs/real/$task
common=(--config.model.depth=18 --config.model.width=16 "$@")

# Two source models (different seeds) for the resnet methods, one two-branch model for ABMT.
for seed in 1 2; do
  $PY -m jaxreid.main --config=configs/pretrain.py:$task --workdir=$out/pretrain_s$seed \
      --config.seed=$seed "${common[@]}"
done
$PY -m jaxreid.main --config=configs/pretrain.py:$task,abmt --workdir=$out/pretrain_abmt \
    --config.seed=1 "${common[@]}"

m1=$out/pretrain_s1/pretrain_seed1/model.msgpack
m2=$out/pretrain_s2/pretrain_seed2/model.msgpack
ma=$out/pretrain_abmt/pretrain_seed1/model.msgpack
for method in cluster_baseline mean_teacher mmt; do
  $PY -m jaxreid.main --config=configs/$method.py:$task --workdir=$out/$method \
      "--config.init.checkpoints=('$m1','$m2')" "${common[@]}"
done
$PY -m jaxreid.main --config=configs/abmt.py:$task --workdir=$out/abmt \
    "--config.init.checkpoints=('$ma',)" "${common[@]}"
$PY experiments/summarise.py $out
