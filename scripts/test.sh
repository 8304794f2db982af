#!/usr/bin/env bash
# Set up a virtual environment and run the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# torch is optional (PyTorch weight-conversion tests); the CPU build is preferred.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>/dev/null \
  || echo "note: torch not installed; PyTorch conversion tests will be skipped"
# One code style (pyink + ruff, configured in pyproject.toml); `pyink jaxreid configs tests
# experiments && ruff check --fix ...` applies it.
.venv/bin/pyink --check --quiet jaxreid configs tests experiments
.venv/bin/ruff check --quiet jaxreid configs tests experiments
# Two workers (pytest-xdist), a test file each at a time: most of the suite's time is XLA
# compiling, and one worker leaves part of the 2-core CI machine idle (measured: 40.8 -> 36.1
# min). The 20 slowest tests are listed at the end: end-to-end runs whose time is XLA compiling
# their train steps. Clean-clone `.ci/run` of commit dca10c8 with a cold compilation cache,
# 2026-12-01: 17 min 21 s (tests 15 min 56 s, 314 passed), after the kill -9 tests were chained
# into one work dir and the ABMT OSNet start-from-torchreid test stopped before training.
.venv/bin/python -m pytest -q -n "${JAXREID_TEST_WORKERS:-2}" --dist loadfile --durations=20 "$@"
