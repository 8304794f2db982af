# Sourced by the scripts run on a lent GPU machine (experiments/gpu_real_adaptation.sh,
# experiments/benchmarks/gpu_*.sh): that machine has no package index, so Python packages it lacks
# (ml_collections) travel as wheels in `.whl/` (ignored by git; carried with the call) and are
# installed into /tmp/site, which joins PYTHONPATH.
if ls .whl/*.whl > /dev/null 2>&1 && ! ${PY:-python3} -c 'import ml_collections' 2> /dev/null; then
  ${PY:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
