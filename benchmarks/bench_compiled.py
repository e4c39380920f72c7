"""The compiled decode step (`gpt2kit.model.compiled`): build time, load time in a fresh process,
and decode speed against eager `decode_step` and `transformers`, on a random GPT-2 124M.

1. build: a fresh process builds the step into an empty cache folder (`--cache-dir`, a new
   temporary folder by default) and reports how long it took;
2. load: another fresh process loads it (`compiled_step(..., build=False)`) and runs one
   step; it reports the load and the whole process up to that step;
3. speed: this process loads the step and times decode steps of `--batch` rows at
   positions `--prompt` .. `--prompt + --new`, interleaved with eager `GPT2.decode_step`
   on the same cache (attending over the positions in use, rounded up to 64, as the
   engine does) and with `transformers`' `generate` (decode tokens/s: the time of a
   `--new`-token run minus a 1-token run), one of each per repeat.

    python benchmarks/bench_compiled.py                          # fp32, batch 1 and 8
    python benchmarks/bench_compiled.py --dtype bfloat16
    python benchmarks/bench_compiled.py --cache-dir ~/.cache/gpt2kit --skip-build
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_generate import cpu_name, decode_rate, transformers_system

# Run in a fresh process: the same random model, its step from the cache, one step.
CHILD = """
import json, sys, time
start = time.perf_counter()
import torch
from gpt2kit import GPT2
from gpt2kit.model.compiled import compiled_step
torch.set_num_threads({threads})
model = GPT2.from_pretrained("{model_dir}", dtype=getattr(torch, "{dtype}"))
ready = time.perf_counter()
step = compiled_step(model, slots={slots}, max_len={max_len}, build={build})
loaded = time.perf_counter()
cfg = model.config
k = [torch.zeros(1, cfg.n_head, {max_len}, cfg.head_size, dtype=model.wte.weight.dtype) for _ in range(cfg.n_layer)]
v = [torch.zeros_like(t) for t in k]
with torch.inference_mode():
    step(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]), k, v)
done = time.perf_counter()
print(json.dumps({{"step_s": loaded - ready, "process_s": done - start, "model_s": ready - start}}))
"""


def child(args: argparse.Namespace, *, build: bool) -> dict:
    code = CHILD.format(
        threads=torch.get_num_threads(),
        model_dir=args.cache_dir / "model",
        dtype=args.dtype,
        slots=args.slots,
        max_len=args.max_len,
        build=build,
    )
    env = dict(os.environ, GPT2KIT_CACHE_DIR=str(args.cache_dir))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--slots", type=int, default=8, help="rows the step is built for")
    ap.add_argument("--max-len", type=int, default=1024, help="cache positions per row")
    ap.add_argument("--prompt", type=int, default=32, help="position of the first decoded token")
    ap.add_argument("--new", type=int, default=64, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache-dir", type=Path, default=None, help="step cache (default: a new temporary one)")
    ap.add_argument("--skip-build", action="store_true", help="the step is already in --cache-dir")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = ap.parse_args()
    if args.cache_dir is None:
        args.cache_dir = Path(tempfile.mkdtemp(prefix="gpt2kit-bench-steps-"))
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"]
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, cpu flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + str(wanted)}"
    )
    print(
        f"model: GPT-2 124M random weights, {args.dtype}; step for {args.slots} slots, cache {args.max_len}"
    )
    if not (args.cache_dir / "model").exists():
        from gpt2kit import GPT2, GPT2Config

        torch.manual_seed(0)
        GPT2(GPT2Config()).save_pretrained(args.cache_dir / "model")

    if not args.skip_build:
        built = child(args, build=True)
        print(f"build (fresh process, empty cache): {built['step_s']:.1f} s")
    loaded = child(args, build=False)
    print(
        f"load (fresh process): compiled_step {loaded['step_s']:.2f} s; process start to first step "
        f"{loaded['process_s']:.2f} s (imports and model init {loaded['model_s']:.2f} s)"
    )
    speed(args)


def speed(args: argparse.Namespace) -> None:
    from gpt2kit import GPT2
    from gpt2kit.model.compiled import compiled_step

    dtype = getattr(torch, args.dtype)
    model = GPT2.from_pretrained(args.cache_dir / "model", dtype=dtype)
    step = compiled_step(model, slots=args.slots, max_len=args.max_len, build=False, cache_dir=args.cache_dir)
    assert step is not None
    cfg = model.config
    for b in args.batch:
        shape = (b, cfg.n_head, args.max_len, cfg.head_size)
        k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
        v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
        idx = torch.randint(0, cfg.vocab_size, (b, 1), generator=torch.Generator().manual_seed(1))

        def compiled_run(k=k, v=v, idx=idx) -> float:
            t0 = time.perf_counter()
            for p in range(args.prompt, args.prompt + args.new):
                step(idx, torch.full((idx.shape[0],), p), k, v)
            return args.new * idx.shape[0] / (time.perf_counter() - t0)

        def eager_run(k=k, v=v, idx=idx) -> float:
            t0 = time.perf_counter()
            for p in range(args.prompt, args.prompt + args.new):
                L = min(args.max_len, -(-(p + 1) // 64) * 64)
                model.decode_step(
                    idx, torch.full((idx.shape[0],), p), [t[:, :, :L] for t in k], [t[:, :, :L] for t in v]
                )
            return args.new * idx.shape[0] / (time.perf_counter() - t0)

        ids = torch.randint(0, cfg.vocab_size, (b, args.prompt), generator=torch.Generator().manual_seed(2))

        runs = {"compiled": compiled_run, "eager": eager_run}
        if not args.no_hf:
            hf = transformers_system(args.cache_dir / "model", ids, dtype=dtype)
            runs["transformers"] = lambda hf=hf, b=b: decode_rate(hf, new=args.new, rows=b)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        with torch.inference_mode():
            for run in runs.values():
                run()  # warm-up
            for r in range(args.repeats):
                order = list(runs) if r % 2 == 0 else list(reversed(runs))
                for name in order:
                    rates[name].append(runs[name]())
        print(f"batch {b}:")
        for name, rs in rates.items():
            print(
                f"  {name:12s} {statistics.median(rs):7.1f} tok/s median (best {max(rs):.1f}; all {', '.join(f'{x:.1f}' for x in rs)})"
            )
        for peer in [p for p in rates if p != "compiled"]:
            ratios = [c / e for c, e in zip(rates["compiled"], rates[peer], strict=True)]
            print(f"  compiled / {peer}: {statistics.median(ratios):.2f}x (per-repeat median)")


if __name__ == "__main__":
    main()
