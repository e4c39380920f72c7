#!/usr/bin/env bash
# The quick start on a fresh machine: install, then prepare Shakespeare, train a small
# GPT-2, and print samples. Extra arguments go to `gpt2kit quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/gpt2kit quickstart "$@"
