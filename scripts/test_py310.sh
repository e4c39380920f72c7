#!/usr/bin/env bash
# The config tests on Python 3.10 (the oldest Python pyproject.toml declares), where TOML
# is read by the tomli package. Run by scripts/test.sh. Only pytest and the dependencies
# that pyproject.toml declares for 3.10 alone are installed (no torch: see the docstring
# of tests/training/test_trainconfig.py). Skipped, saying so, when no 3.10 interpreter is found.
set -euo pipefail
cd "$(dirname "$0")/.."
PY310=""
for candidate in python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
    PY310="$candidate"
    break
  fi
done
if [ -z "$PY310" ]; then
  echo "==> config tests on Python 3.10: skipped, no Python 3.10 interpreter on this machine"
  exit 0
fi
echo "==> config tests on Python 3.10 ($PY310)"
if [ ! -x .venv310/bin/python ]; then
  "$PY310" -m venv .venv310
fi
# The dependencies whose markers select Python < 3.11, read from pyproject.toml itself.
deps=$(.venv/bin/python - <<'PY'
import tomllib
from packaging.requirements import Requirement
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    req = Requirement(dep)
    if req.marker and req.marker.evaluate({"python_version": "3.10"}) and not req.marker.evaluate({"python_version": "3.11"}):
        print(dep)
PY
)
mapfile -t deps <<<"$deps"
.venv310/bin/python -m pip install -q --disable-pip-version-check "pytest>=8" "pytest-timeout>=2.3" "${deps[@]}"
# --noconftest: tests/conftest.py builds models with torch, which this run doesn't have.
.venv310/bin/python -m pytest -q --noconftest -p no:cacheprovider tests/training/test_trainconfig.py
