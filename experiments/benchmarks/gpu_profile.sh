#!/usr/bin/env bash
# Issue 16 (c) on one lent GPU, sized for a session's device time (about 6 minutes of command):
#   1. the ResNet-50 bfloat16 MMT step (256x128, batch 64), timed and traced with jax.profiler,
#      summarised per kind of kernel (experiments/benchmarks/summarise_trace.py);
#   2. the same step at batch 32 and 128 per device (how far batch size moves the rate);
#   3. jaxreid vs PyTorch (AMP) on the OSNet x0.25 MMT step (the ResNet-50 ratio, 2.26x, was
#      measured on 2026-11-30: experiments/benchmarks/results_benchmark.md).
# Usage: [OUT=dir] bash experiments/benchmarks/gpu_profile.sh
#        (wheels: experiments/benchmarks/gpu_wheels.sh)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-workdirs/gpu_profile}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source experiments/benchmarks/gpu_wheels.sh
quiet() { grep -v '^[IWE][0-9]\{4\} '; }
bench() {  # batch, then extra flags
  local b=$1; shift
  $PY -m jaxreid.tools.benchmark --methods=mmt --dtypes=bfloat16 --depth=50 --width=64 --height=256 \
      --img_width=128 --batch="$b" --steps=20 --train_images=2048 --test_images=2048 \
      --out="$OUT/bench_mmt_bf16_b$b.json" "$@" 2>&1 | quiet | tail -3
}
bench 64 --profile_dir=/tmp/trace
$PY experiments/benchmarks/summarise_trace.py /tmp/trace/mmt_bfloat16 --steps=20 --top=30 \
    | tee "$OUT/trace_summary.md"
for b in 32 128; do bench "$b"; done
$PY experiments/benchmarks/bench_cpu_vs_torch.py --device=cuda --dtype=bfloat16 --sizes=256x128x64 \
    --backbones=osnet_x0_25 --methods=mmt --steps=20 --json="$OUT/ratio_osnet.json" 2>&1 | quiet
