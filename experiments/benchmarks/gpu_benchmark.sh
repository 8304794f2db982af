#!/usr/bin/env bash
# The papers' setting on one accelerator: ResNet-50, 256x128, batch 64, every method in float32 and
# bfloat16, Market-1501-sized clustering (12,936 train images, 500 K-means clusters / Jaccard +
# DBSCAN) and evaluation (19,281 query + gallery images); one process per method and dtype so that
# each row's peak device memory is its own.
# Usage: [METHODS="mmt abmt"] [OUT=dir] bash experiments/benchmarks/gpu_benchmark.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-workdirs/gpu_benchmark}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
for m in ${METHODS:-pretrain mean_teacher mmt abmt}; do
  for dtype in ${DTYPES:-float32 bfloat16}; do
    $PY -m jaxreid.tools.benchmark --methods="$m" --dtypes="$dtype" --depth=50 --width=64 \
        --height=256 --img_width=128 --batch=64 --steps=20 --train_images=12936 \
        --test_images=19281 --num_clusters=500 --out="$OUT/bench_${m}_$dtype.json" 2>&1 \
        | grep -v '^[IW][0-9]\{4\} ' | tee "$OUT/bench_${m}_$dtype.log"
  done
done
