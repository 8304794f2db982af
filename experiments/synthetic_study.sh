#!/usr/bin/env bash
# Every method on the previous synthetic world (generator version 3 settings, pinned by $v3 below;
# results in experiments/results_training.md), plus the float32 / bfloat16 comparison (MMT, two
# seeds each) and a longer ABMT budget. The current default world: synthetic_yardstick.sh.
# Usage: [PARALLEL=1] bash experiments/synthetic_study.sh        (PARALLEL runs all at once: GPU)
# Results: workdirs/synthetic/<run>/results.json, summarised by experiments/summarise.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=workdirs/synthetic
mkdir -p "$out"
v3="--config.data.synthetic.domain_gap=1.0 --config.data.synthetic.num_test_ids=50 --config.data.crop_pad=10 --config.train.lr=3.5e-4"
runs=(
  "cluster_baseline|--config=configs/cluster_baseline.py"
  "mean_teacher|--config=configs/mean_teacher.py"
  "mmt|--config=configs/mmt.py"
  "abmt|--config=configs/abmt.py"
  "abmt_20ep|--config=configs/abmt.py --config.train.epochs=20"
  "mmt_seed2|--config=configs/mmt.py --config.seed=2 --config.pretrain.seed=2"
  "mmt_bf16|--config=configs/mmt.py --config.model.dtype=bfloat16"
  "mmt_bf16_seed2|--config=configs/mmt.py --config.model.dtype=bfloat16 --config.seed=2 --config.pretrain.seed=2"
)
source experiments/launch.sh
for entry in "${runs[@]}"; do
  name=${entry%%|*}; flags=${entry#*|}
  launch "$name" "$out" $PY -m jaxreid.main $flags $v3 --workdir=$out/$name
done
wait_all
$PY experiments/summarise.py "$out"
