"""Where a compiled decode step's time goes, kernel by kernel, grouped by layer.

Builds the compiled step of the random gpt2 124M (bench_generate's folder) for `--rows`
rows (1: the one-row step; 8: the server's batch step) in a precision, with inductor's
kernel profiling on (`cpp.enable_kernel_profile`: every generated kernel records itself to
`torch.profiler`; its GEMMs are attributed by the order they run: c_attn, attn.c_proj,
c_fc, mlp.c_proj per block, then the lm_head), runs `--steps` decode steps
at position `--position` under the profiler, and prints per group: milliseconds per step,
share of the step, and for the GEMMs the bandwidth their weights were read at. The
profiled build goes to a temporary step cache (the profiling hooks cost time of their own,
so its total is a little above the plain step's), and the machine's CPU flags and level
are printed with it.

    python benchmarks/bench_step_profile.py --precision int8bf16
    python benchmarks/bench_step_profile.py --precision bf16 --level avx2   # a child process at that level
    python benchmarks/bench_step_profile.py --precision bf16 --rows 8       # the step serving 8 clients
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PRECISIONS = {  # name: (dtype, quantize)
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8": ("float32", "int8"),
    "int8bf16": ("bfloat16", "int8"),
}
LINEARS = {(768, 2304): "c_attn", (768, 768): "attn.c_proj", (768, 3072): "c_fc", (3072, 768): "mlp.c_proj"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="int8bf16")
    p.add_argument("--level", default="native", help="a gpt2kit.device.CPU_LEVELS name")
    p.add_argument("--rows", type=int, default=1, help="rows per step (the step's batch)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--position", type=int, default=96)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gpt2kit-bench"))
    args = p.parse_args()
    from gpt2kit.device import CPU_LEVELS

    if args.level != "native" and os.environ.get("GPT2KIT_PROFILE_LEVEL") != args.level:
        env = {**os.environ, **CPU_LEVELS[args.level], "GPT2KIT_PROFILE_LEVEL": args.level}
        sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)
    profile(args)


def profile(args: argparse.Namespace) -> None:
    from bench_generate import make_model_dir
    from bench_roofline import machine
    from gpt2kit import GPT2
    from gpt2kit.model.compiled import build, compiled_step

    folder = Path(args.work) / "gpt2-random"
    if not (folder / "config.json").exists():
        make_model_dir(folder)
    dtype, quantize = PRECISIONS[args.precision]
    model = GPT2.from_pretrained(folder, dtype=dtype, quantize=quantize).eval()
    print(machine(), f"level {args.level}", f"precision {args.precision}", f"rows {args.rows}", sep="; ")
    options = build._options

    def profiled(device, m):  # the step's own options, and its kernels recording themselves
        return {**options(device, m), "cpp.enable_kernel_profile": True}

    build._options = profiled
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        n = args.rows
        step = compiled_step(model, slots=n, max_len=1024, build=True, cache_dir=cache, exact=n == 1)
        print(f"profiled {n}-row step built in {time.perf_counter() - t:.0f}s")
        c = model.config
        k = [
            torch.zeros(n, c.n_head, 1024, c.head_size, dtype=model.wte.weight.dtype)
            for _ in range(c.n_layer)
        ]
        v = [torch.zeros_like(x) for x in k]
        idx = torch.full((n, 1), 464)
        pos = torch.arange(args.position, args.position + n)  # rows at their own positions
        with torch.inference_mode():
            for _ in range(5):
                step(idx, pos, k, v)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(idx, pos, k, v)
            plain = (time.perf_counter() - t) / args.steps
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    step(idx, pos, k, v)
    report(prof, args, plain, weight_bytes(args.precision))


def weight_bytes(precision: str) -> int:
    return {"fp32": 4, "bf16": 2}.get(precision, 1)


GEMM = re.compile(r"(int8pack_mm|addmm|linear|gemm|(?<!b)mm_|(?<!b)mm$)", re.IGNORECASE)  # not bmm: attention
ORDER = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")  # a block's GEMMs, in the order they run


def report(prof, args: argparse.Namespace, plain: float, size: int) -> None:
    """Kernels in the order they ran: the GEMMs of each step are c_attn, attn.c_proj, c_fc,
    mlp.c_proj per block, then the lm_head (the kernel profile records no shapes)."""
    events = [e for e in prof.events() if e.name != "[memory]" and not e.name.startswith("ProfilerStep")]
    per_group: dict[str, float] = collections.defaultdict(float)
    names: dict[str, set] = collections.defaultdict(set)
    gemms = [e for e in events if GEMM.search(e.name) and not e.name.startswith("aten::")]
    per_step = len(gemms) // args.steps
    expected = 4 * 12 + 1
    for i, e in enumerate(gemms):
        j = i % per_step
        group = ("lm_head" if j == per_step - 1 else ORDER[j % 4]) if per_step == expected else "GEMMs"
        per_group[group] += e.self_cpu_time_total / 1e3 / args.steps
        names[group].add(re.sub(r"_\d+$", "", e.name)[:48])
    seen = {id(e) for e in gemms}
    for e in events:
        if id(e) in seen:
            continue
        if e.name.startswith("aten::"):
            group = "the step's own aten ops (its wrapper)"
        elif any(word in e.name for word in ("bmm", "softmax", "attention", "flash")):
            group = "attention (bmm, softmax)"
        else:
            group = "fused elementwise, norms"
        per_group[group] += e.self_cpu_time_total / 1e3 / args.steps
        names[group].add(re.sub(r"_\d+$", "", e.name)[:48])
    total = sum(per_group.values())
    print(
        f"\nplain step {plain * 1e3:.2f} ms ({args.rows / plain:.1f} tokens/s); profiled kernels {total:.2f} ms per step"
    )
    if per_step != expected:
        print(f"({per_step} GEMM kernels per step, not {expected}: not attributed to layers)")
    print(f"{'group':40s} {'ms/step':>8s} {'share':>6s} {'GB/s':>6s}  kernels")
    params = {"c_attn": 768 * 2304, "attn.c_proj": 768 * 768, "c_fc": 768 * 3072, "mlp.c_proj": 3072 * 768}
    params["lm_head"] = 768 * 50257
    for group, ms in sorted(per_group.items(), key=lambda kv: -kv[1]):
        gbs = ""
        if group in params:
            n = params[group] * size * (1 if group == "lm_head" else 12)
            gbs = f"{n / (ms / 1e3) / 1e9:6.1f}"
        print(f"{group:40s} {ms:8.3f} {ms / total:6.1%} {gbs:>6s}  {', '.join(sorted(names[group]))[:60]}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
