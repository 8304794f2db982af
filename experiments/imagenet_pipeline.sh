#!/usr/bin/env bash
# The papers' whole pipeline on real data (docs/reference.md section 3; issue 13): torchvision's
# ImageNet MobileNetV2 -> supervised pre-training on Market-1501 -> adaptation to CUHK03 (detected)
# without its labels (task market2cuhk_imagenet; cuhk2market_imagenet is the reverse).
#
# The source models are pre-trained once and shared by every method: seeds 1 and 2 of the
# one-branch network (MMT takes both, the baselines seed 1) and ABMT's two-branch network
# (seed 1; the ABMT paper pre-trains its own architecture). Each adaptation starts from them via
# --config.init.checkpoints. MMT_SOURCES=shared starts both MMT networks from the seed-1 model
# instead (no second pre-training; they diverge through their own augmented views and the mutual
# losses, as the MMT rows from published re-ID weights do: README, "MMT's two networks from one
# published model"). Budget: the task preset (pre-training 20 x 100, adaptation 3 x 100, batch
# 32); inputs 128x64 by default (HEIGHT / WIDTH): at 256x128 one MobileNetV2 pre-training
# alone takes about 2.4 h on the 2-core CPU (7.5 img/s measured,
# experiments/benchmarks/results_benchmark.md).
#
# Usage: [RUNS_DIR=runs/real] [TASK=market2cuhk_imagenet] [HEIGHT=128 WIDTH=64] \
#          [ROWS="cluster_baseline mean_teacher mmt abmt"] [MMT_SOURCES=own|shared] \
#          bash experiments/imagenet_pipeline.sh [extra --config flags for every run]
# Resumable: finished runs (results.json) are skipped, unfinished ones resume from checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/launch.sh
PY=${PYTHON:-.venv/bin/python}
task=${TASK:-market2cuhk_imagenet}
out=${RUNS_DIR:-runs/real}/$task
mkdir -p "$out"
common=(--config.data.height="${HEIGHT:-128}" --config.data.width="${WIDTH:-64}")
rows=" ${ROWS:-cluster_baseline mean_teacher mmt abmt} "
mmt_sources=${MMT_SOURCES:-own}
[[ $mmt_sources == own || $mmt_sources == shared ]] || { echo "MMT_SOURCES must be own or shared"; exit 2; }

run() {  # name, config, then flags: skipped when finished
  local name=$1 config=$2
  shift 2
  [[ -f $out/$name/results.json ]] && return 0
  launch "$name" "$out" $PY -m jaxreid.main --config="$config" --workdir="$out/$name" \
      "${common[@]}" "$@"
}
source_model() { echo "$out/$1/pretrain_seed$2/model.msgpack"; }

# 1. Source pre-training (supervised, Market-1501), from the ImageNet weights of the task preset.
run pretrain_s1 "configs/$task.py:pretrain" --config.seed=1 "$@"
[[ "$rows" == *" mmt "* && $mmt_sources == own ]] && run pretrain_s2 "configs/$task.py:pretrain" --config.seed=2 "$@"
[[ "$rows" == *" abmt "* ]] && run pretrain_abmt_s1 "configs/$task.py:pretrain,abmt" --config.seed=1 "$@"

# 2. Adaptation to the target without its labels, every method from the shared source models.
one=$(source_model pretrain_s1 1)
[[ $mmt_sources == own ]] && two=$(source_model pretrain_s2 2) || two=$one
for row in cluster_baseline mean_teacher mmt abmt; do
  [[ "$rows" == *" $row "* ]] || continue
  case $row in
    mmt) checkpoints="('$one', '$two')" ;;
    abmt) checkpoints="('$(source_model pretrain_abmt_s1 1)',)" ;;
    *) checkpoints="('$one',)" ;;
  esac
  run "${row}_s1" "configs/$task.py:$row" --config.seed=1 --config.init.checkpoints="$checkpoints" "$@"
done
wait_all
$PY experiments/summarise.py "$out"
