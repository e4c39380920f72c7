#!/usr/bin/env bash
# Create .venv and install gpt2kit into it. Idempotent: a second run is quick.
#   scripts/setup.sh          the package
#   scripts/setup.sh dev      plus test tools, transformers, playwright and Debian's chromium
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
pip_q() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
# torch first, pinned: on machines with the local CPU wheel this takes it (no CUDA download);
# elsewhere it is pip's normal wheel. Skipped when a torch is already installed.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "==> installing torch"
  pip_q "torch==2.13.0" || pip_q "torch>=2.4"
fi
stamp=".venv/.gpt2kit-installed-${extra:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing gpt2kit${extra:+[$extra]}"
  pip_q -e ".${extra:+[$extra]}"
  touch "$stamp"
fi
if [ "$extra" = "dev" ] && ! command -v chromium >/dev/null 2>&1; then
  # The Explorer's browser test drives Debian's Chromium (no browser download).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing chromium (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will be skipped" >&2
  else
    echo "note: chromium not found and not root; browser tests will be skipped" >&2
  fi
fi
