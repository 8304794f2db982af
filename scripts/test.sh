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
# compiling, which one worker leaves partly idle on a 2-core machine (docs/performance.md, "The
# test suite"). The 20 slowest tests are listed at the end.
.venv/bin/python -m pytest -q -n "${JAXREID_TEST_WORKERS:-2}" --dist loadfile --durations=20 "$@"
