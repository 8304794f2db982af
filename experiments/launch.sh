# Sourced by the study scripts: `launch NAME LOGDIR CMD...` runs one command, echoing it, in the
# background with its log in LOGDIR/NAME.log when PARALLEL=1 (GPU: many small runs at once), else
# in the foreground with the log also on the terminal; `wait_all` waits for the background runs.
# XLA_PYTHON_CLIENT_PREALLOCATE=false lets several processes share one GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
_launched=()

launch() {
  local name=$1 logdir=$2
  shift 2
  echo "$*"
  if [[ "${PARALLEL:-0}" == 1 ]]; then
    "$@" > "$logdir/$name.log" 2>&1 &
    _launched+=($!)
  else
    "$@" 2>&1 | tee "$logdir/$name.log"
  fi
}

wait_all() {
  local p
  for p in "${_launched[@]}"; do wait "$p"; done
  _launched=()
}
