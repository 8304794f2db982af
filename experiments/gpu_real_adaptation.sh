#!/usr/bin/env bash
# The papers' adaptation schedule on one GPU for the real task msmt17 -> market1501 (OSNet x0.25
# from torchreid's MSMT17 weights, 256x128): MMT (K-means 500) and ABMT, 40 epochs x 400
# iterations of batch 64, lr 3.5e-4, evaluated every EVAL_EVERY epochs. Both runs share the GPU
# (one process each): OSNet x0.25 at batch 64 is far too small to fill an H100/H200 alone.
# A lent GPU session has about 10 minutes of command time, so the script stops both runs at
# TIME_LIMIT seconds and keeps what they reached: epoch checkpoints in $RUNS (rerunning the same
# command where $RUNS persists resumes them), evaluations every EVAL_EVERY epochs in the logs.
# Measured on an H200 (experiments/results_real.md, "On one GPU"): in 550 s, ABMT reached epoch
# 11 (53.6 mAP after epoch 10) and MMT epoch 7 (40.6 mAP after epoch 6), from 24.8.
#
# Usage (on the GPU machine, from the repository root):
#   [DATA=dir] [WEIGHTS=dir] [OUT=dir] [RUNS=dir] [TIME_LIMIT=520] [EVAL_EVERY=5] \
#     [ROWS="mmt abmt"] bash experiments/gpu_real_adaptation.sh [extra --config flags for both]
# DATA / WEIGHTS default to ../shared/{data,weights}. How the data travel to a lent machine (its
# tool carries at most 64 MiB): a `.gpu/` folder beside the code (ignored by git) holding
#   market1501.tar.xz  Market-1501 without the 3,819 junk (id -1) gallery images, which the
#                      reader drops anyway: 55.5 MB, from ../shared/data with
#                      find market1501 -type f ! -name '-1_*' | tar cf - -T - | xz -9e
#   osnet_x0_25_msmt17.pth
#   xla_cache.tar      (optional) the compiled programs an earlier call returned
# is unpacked first; packages the machine lacks travel in `.whl/`
# (experiments/benchmarks/gpu_wheels.sh).
# Outputs under $OUT: one log per run, runs.tar.gz (the work dirs without their checkpoints:
# config, metrics, results, plots), xla_cache.tar, gpu.txt (the device, its memory at the end).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-workdirs/gpu_real}
RUNS=${RUNS:-/tmp/gpu_real_runs}
TIME_LIMIT=${TIME_LIMIT:-520}
EVAL_EVERY=${EVAL_EVERY:-5}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1
t0=$(date +%s)

source experiments/benchmarks/gpu_wheels.sh
if [[ -d .gpu ]]; then  # what travelled with the code to a lent machine
  if [[ -f .gpu/market1501.tar.xz && ! -d /tmp/shared/data/market1501 ]]; then
    mkdir -p /tmp/shared/data /tmp/shared/weights
    tar -xJf .gpu/market1501.tar.xz -C /tmp/shared/data || exit 1
  fi
  cp -n .gpu/*.pth /tmp/shared/weights/ 2>/dev/null
  if [[ -f .gpu/xla_cache.tar ]]; then  # compiled programs returned by an earlier call
    mkdir -p ~/.cache/jaxreid/xla && tar -xf .gpu/xla_cache.tar -C ~/.cache/jaxreid/xla
  fi
  DATA=${DATA:-/tmp/shared/data}
  WEIGHTS=${WEIGHTS:-/tmp/shared/weights}
fi
export JAXREID_SHARED_DATA=${DATA:-../shared/data}
export JAXREID_SHARED_WEIGHTS=${WEIGHTS:-../shared/weights}
echo "[gpu_real] data $JAXREID_SHARED_DATA ($(ls "$JAXREID_SHARED_DATA/market1501/bounding_box_train" \
    | wc -l) train images), unpacked in $(( $(date +%s) - t0 )) s"
{ nvidia-smi 2>&1; $PY -c 'import jax; print("jax", jax.__version__, jax.devices())'; } \
    > "$OUT/gpu.txt" 2>&1

# Two processes on one GPU: each may take a share of its memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
save_runs() {  # the work dirs without their checkpoints, to $OUT (replaced whole, never half)
  tar -czf "$OUT/runs.tmp.tgz" --exclude=checkpoints -C "$RUNS" . 2> /dev/null \
      && mv "$OUT/runs.tmp.tgz" "$OUT/runs.tar.gz"
}
declare -A pid
for row in ${ROWS:-mmt abmt}; do
  $PY -m jaxreid.main --config=configs/msmt2market.py:$row --workdir="$RUNS/${row}_s1" \
      --config.seed=1 --config.data.batch_size=64 --config.data.eval_batch_size=256 \
      --config.train.epochs=40 --config.train.iters=400 --config.train.eval_every="$EVAL_EVERY" \
      --config.train.log_every=100 --config.train.coupling=False "$@" \
      > "$OUT/$row.log" 2>&1 &
  pid[$row]=$!
  echo "[gpu_real] started $row (pid ${pid[$row]})"
done

# Wait until both finish or the time limit; a run that fails is reported at once (its log's end)
# and, in the first minutes, stops the other too (a setup error is cheaper to fix than to wait on).
failed=0
ticks=0
while :; do
  alive=0
  for row in "${!pid[@]}"; do
    p=${pid[$row]}
    [[ -z $p ]] && continue
    if kill -0 "$p" 2> /dev/null; then alive=1; continue; fi
    wait "$p"; rc=$?
    pid[$row]=''
    echo "[gpu_real] $row exited with status $rc after $(( $(date +%s) - t0 )) s"
    if (( rc != 0 )); then
      failed=1
      grep -v '^[IW][0-9]\{4\} ' "$OUT/$row.log" | tail -25
    fi
  done
  elapsed=$(( $(date +%s) - t0 ))
  if (( failed && elapsed < 180 )); then
    echo "[gpu_real] a run failed early: stopping the others"
    for p in "${pid[@]}"; do [[ -n $p ]] && kill "$p" 2> /dev/null; done
    break
  fi
  (( alive )) || break
  if (( elapsed >= TIME_LIMIT )); then
    echo "[gpu_real] time limit ${TIME_LIMIT} s reached: stopping the runs (epoch checkpoints kept)"
    for p in "${pid[@]}"; do [[ -n $p ]] && kill -INT "$p" 2> /dev/null; done
    sleep 10
    for p in "${pid[@]}"; do [[ -n $p ]] && kill -9 "$p" 2> /dev/null; done
    break
  fi
  # Keep a current copy of the work dirs under $OUT: a call cut short still returns them.
  (( ++ticks % 12 == 0 )) && save_runs
  sleep 5
done
wait 2> /dev/null
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> "$OUT/gpu.txt" 2>&1
echo "[gpu_real] wall time $(( $(date +%s) - t0 )) s"
save_runs
# jaxreid.main's persistent compilation cache: carried back as .gpu/xla_cache.tar, it spares the
# next call on the same kind of machine the 3-5 minutes of compiling (returned if under 16 MiB).
tar -cf "$OUT/xla_cache.tar" -C ~/.cache/jaxreid/xla . 2> /dev/null
for row in ${ROWS:-mmt abmt}; do
  echo "== $row"
  grep -E '^\[(source only|mmt|abmt|setup|decode)|epoch [0-9]+/|Traceback|Error' "$OUT/$row.log" \
      | grep -v '^\[config\]' | tail -30
done
exit $failed
