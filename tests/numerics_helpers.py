"""Run the numerics measurements (`gpt2kit.model.numerics`) at a CPU level, in a fresh process.

A level (`gpt2kit.device.CPU_LEVELS`) is a set of environment variables that torch, oneDNN
and MKL read when they load, so each measurement runs in a subprocess started with them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gpt2kit.device import CPU_LEVELS, cpu_features, cpu_level_missing
from gpt2kit.model.stepcache import CACHE_ENV

# The child prints one JSON line: `measure_dir`'s result, or transformers' greedy tokens.
_MEASURE = """
import json, sys
from gpt2kit.model.numerics import measure_dir
print(json.dumps(measure_dir(**json.loads(sys.argv[1]))))
"""
_TRANSFORMERS = """
import json, sys, torch, transformers
args = json.loads(sys.argv[1])
model = transformers.GPT2LMHeadModel.from_pretrained(args["path"]).eval()
prompt = torch.tensor([args["prompt"]])
out = model.generate(prompt, max_new_tokens=args["n"], do_sample=False, pad_token_id=0, eos_token_id=None)
print(json.dumps({"tokens": out[0, prompt.shape[1]:].tolist()}))
"""


def level_skip(level: str) -> str | None:
    """Why `level` is not run on this CPU (None: it is). "avx512" caps AMX off, so on a CPU
    without AMX it is the native level again, and not run twice."""
    missing = cpu_level_missing(level)
    if missing:
        return f"the {level} level: {missing}"
    if level == "avx512" and not cpu_features().get("amx_tile"):
        return "the avx512 level only caps AMX, and this CPU has none: it is the native level"
    return None


def run_at(level: str, args: dict, *, cache: Path, transformers: bool = False) -> dict:
    """`measure_dir(**args)` (or, with `transformers`, transformers' greedy tokens for
    args["path"], args["prompt"], args["n"]) in a new process at CPU `level`, with the step
    cache `cache`."""
    env = {**os.environ, **CPU_LEVELS[level], CACHE_ENV: str(cache)}
    code = _TRANSFORMERS if transformers else _MEASURE
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True, timeout=1700
    )
    if done.returncode != 0:
        raise AssertionError(f"the {level} child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
