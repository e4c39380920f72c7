"""The numerics matrix on gpt2 124M: every precision, eager and compiled, at every CPU level.

The model is the issue's: random gpt2 124M (transformers' default `GPT2Config`, seed 0),
saved with `save_pretrained` and loaded by gpt2kit per precision (fp32, bf16, int8 =
`quantize="int8"` on float32 weights). For each CPU level (`gpt2kit.device.CPU_LEVELS`,
environment variables set before torch loads, so each runs in a fresh process) and each
precision, one process builds (or loads) the one-row compiled step and measures
(`gpt2kit.model.numerics.measure`): 64 greedy tokens after an 8-token prompt from a play,
compiled and eager; the largest |logit difference| between them over the prefill and 32
decode steps; the mean NLL of 128 tokens of the play through each decode path. A second
process loads the saved step and decodes again (two processes, the same tokens?). fp32 is
held to transformers' greedy tokens at the same level, bf16 and int8 to fp32 eager's.

Prints the CPU flags, then per option: the first-mismatch depth against its reference and
against its own eager twin, max |dlogit|, mean NLL and its change from fp32, and PASS/FAIL
against `gpt2kit.model.numerics.BOUNDS` (docs/numerics.md).

    python benchmarks/bench_numerics.py                        # native and avx2 (and avx512 on AMX)
    python benchmarks/bench_numerics.py --levels avx2 --precisions int8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2kit import Tokenizer
from gpt2kit.data.corpora import shakespeare_documents
from gpt2kit.device import CPU_LEVELS, cpu_features, cpu_level_missing
from gpt2kit.model.numerics import BOUNDS, GREEDY_TOKENS, check, first_mismatch, nll_delta
from gpt2kit.model.stepcache import CACHE_ENV

FLAGS = ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
MEASURE = """
import json, sys
from gpt2kit.model.numerics import measure_dir
print(json.dumps(measure_dir(**json.loads(sys.argv[1]))))
"""
TRANSFORMERS = """
import json, sys, torch, transformers
args = json.loads(sys.argv[1])
model = transformers.GPT2LMHeadModel.from_pretrained(args["path"]).eval()
prompt = torch.tensor([args["prompt"]])
out = model.generate(prompt, max_new_tokens=args["n"], do_sample=False, pad_token_id=0, eos_token_id=None)
print(json.dumps({"tokens": out[0, prompt.shape[1]:].tolist()}))
"""


def random_gpt2(path: Path) -> Path:
    if not (path / "config.json").exists():
        import transformers

        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(path)
    return path


def child(level: str, code: str, args: dict, cache: Path) -> dict:
    env = {**os.environ, **CPU_LEVELS[level], CACHE_ENV: str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def level_rows(level: str, precisions: list[str], base: dict, cache: Path) -> list[dict]:
    """One row per (precision, eager|compiled) at `level`, with its checks against BOUNDS."""
    reference = child(
        level, TRANSFORMERS, {"path": base["path"], "prompt": base["prompt"], "n": GREEDY_TOKENS}, cache
    )
    measured = {}
    for precision in ["fp32", *[p for p in precisions if p != "fp32"]]:
        t0 = time.perf_counter()
        r = child(level, MEASURE, {**base, "precision": precision, "compiled": True}, cache)
        if "error" not in r:
            again = child(
                level, MEASURE, {**base, "precision": precision, "compiled": True, "tokens_only": True}, cache
            )
            r["again"] = again.get("tokens")
        r["seconds"] = time.perf_counter() - t0
        measured[precision] = r
        raw = {k: v for k, v in r.items() if k not in ("tokens", "eager_tokens", "again")}
        print(f"  {level} {precision} measured: {json.dumps(raw)}", flush=True)
    fp32 = measured["fp32"]
    rows = []
    for precision in precisions:
        r = measured[precision]
        if "error" in r:
            rows.append({"level": level, "option": f"{precision} compiled", "error": r["error"]})
            continue
        ref_tokens = reference.get("tokens") if precision == "fp32" else fp32.get("eager_tokens")
        ref_nll = fp32["eager_nll"]
        for path, tokens, nll in (
            ("eager", r["eager_tokens"], r["eager_nll"]),
            ("compiled", r["tokens"], r["nll"]),
        ):
            row = {
                "level": level,
                "option": f"{precision} {path}",
                "isa": f"{r['capability']} / {r['inductor_isa']}"
                + (f" / {r['scheme']}" if r["scheme"] else ""),
                "depth_ref": first_mismatch(tokens, ref_tokens) if ref_tokens else None,
                "nll": nll,
                "nll_rel": nll_delta(nll, ref_nll),
            }
            measures = {"depth_vs_fp32": row["depth_ref"], "nll_rel": row["nll_rel"]}
            if path == "compiled":
                row.update(
                    depth_own=first_mismatch(r["tokens"], r["eager_tokens"]), dlogit=r["compiled_logits"]
                )
                row["two_processes"] = r["again"] == r["tokens"]
                measures.update(compiled_logits=row["dlogit"], depth_compiled=row["depth_own"])
            failures = check(precision, **measures)
            if path == "compiled" and not row["two_processes"]:
                failures.append("a second process decoded other tokens")
            row["verdict"] = "PASS" if not failures else "FAIL: " + "; ".join(failures)
            rows.append(row)
        print(f"  {level} {precision}: {r['seconds']:.0f} s", flush=True)
    return rows


def show(rows: list[dict]) -> None:
    head = "| level | option | ISA (aten / inductor / int8) | 1st mismatch vs ref | vs own eager | max abs dlogit | mean NLL | NLL vs fp32 | 2 procs | verdict |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['level']} | {r['option']} | | | | | | | | ERROR: {r['error'][:120]} |")
            continue
        own = f"{r['depth_own']}/{GREEDY_TOKENS}" if "depth_own" in r else ""
        dl = f"{r['dlogit']:.2g}" if "dlogit" in r else ""
        two = ("same" if r["two_processes"] else "DIFFER") if "two_processes" in r else ""
        print(
            f"| {r['level']} | {r['option']} | {r['isa']} | {r['depth_ref']}/{GREEDY_TOKENS} | {own} | {dl} | "
            f"{r['nll']:.4f} | {r['nll_rel']:+.2e} | {two} | {r['verdict']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", nargs="+", choices=list(CPU_LEVELS), default=None)
    parser.add_argument("--precisions", nargs="+", choices=list(BOUNDS), default=list(BOUNDS))
    parser.add_argument(
        "--model", type=Path, default=Path(tempfile.gettempdir()) / "gpt2kit-random-gpt2-124m"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="step cache (default: a new temporary folder)"
    )
    args = parser.parse_args()
    features = cpu_features()
    levels = args.levels or ["native", "avx2"] + (["avx512"] if features.get("amx_tile") else [])
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print("CPU flags: " + " ".join(f for f in FLAGS if features.get(f)))
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    ids = Tokenizer.gpt2().encode(shakespeare_documents()[0][2000:4000])
    base = {"path": str(random_gpt2(args.model)), "prompt": ids[:8], "text": ids[8:136], "n": GREEDY_TOKENS}
    cache = args.cache or Path(tempfile.mkdtemp(prefix="gpt2kit-numerics-steps-"))
    rows = []
    for level in levels:
        if cpu_level_missing(level):
            print(f"skipping {level}: {cpu_level_missing(level)}")
            continue
        rows += level_rows(level, args.precisions, base, cache)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    show(rows)


if __name__ == "__main__":
    main()
