#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs everything, lints, runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -m slow, scripts/test.sh tests/model/test_model.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
echo "==> ruff"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
if [ "$#" -eq 0 ]; then
  scripts/test_py310.sh
fi
echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
