"""The memory roofline of batch-1 decoding: how fast each weight format could go, and where
the time goes, one Linear at a time.

A one-token decode step reads every weight once (a matrix-vector product per Linear), so
its speed is bounded by memory bandwidth / bytes read per token. This prints:

1. the machine (CPU flags as torch sees them, threads) and the read bandwidth it reaches
   with torch's threads: the best of --repeats sums of a 512 MiB float32 tensor;
2. the bytes one decode token of gpt2 124M reads in each format (the four Linears of 12
   blocks, the lm_head tied to wte: 38.6M of the 124M parameters, the small float tensors,
   and the KV cache at --position), hence each format's tokens/s bound;
3. each Linear of a block and the lm_head alone at batch 1, in each candidate kernel, its
   time and the bandwidth it reaches (as % of the measured bandwidth). Each candidate cycles
   through enough copies of its weight to pass 128 MB, so the weights stream from memory as
   in a real step (one copy would sit in the 32 MB L3 and look faster than memory allows).
   The sum over one block x 12 + the lm_head is the step's matrix time in that kernel.

Candidates (x: the one-row activation):
- fp32 / bf16: `F.linear`, eager;
- fp32-compiled / bf16-compiled: the same Linear compiled as the step is (inductor with
  freezing, max_autotune, CPP and ATen GEMM backends; --compiled, a compile each);
- int8wo-bf16 / int8wo-fp32: `torch.ops.aten._weight_int8pack_mm` (int8 weight,
  per-channel scale, float activation; ATen's own kernel);
- int8dyn: the activation quantized per row, `torch._int_mm` (oneDNN), rescaled: the
  int8-dynamic scheme's products, eager;
- int8dyn-compiled / int8wo-bf16-compiled: torchao's two schemes through inductor (--compiled).
  Caveat, measured 2026-12-04: these compiled candidates do not yet reproduce the step (their
  weights are not frozen: inductor recomputes int8's u8s8 compensation, a sum over the
  weight, every call), so their figures are far below the step's; use them only after fixing that.

    python benchmarks/bench_roofline.py                       # this CPU's own level
    python benchmarks/bench_roofline.py --level avx2          # a child process under the AVX2 level
    python benchmarks/bench_roofline.py --compiled --only c_fc lm_head
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2kit import GPT2Config

LINEARS = {  # name: (in, out), gpt2 124M
    "c_attn": (768, 2304),
    "attn.c_proj": (768, 768),
    "c_fc": (768, 3072),
    "mlp.c_proj": (3072, 768),
    "lm_head": (768, 50257),
}
STREAM_BYTES = 128 * 2**20  # each candidate's weights in all its copies: 4x the L3
EAGER = ("fp32", "bf16", "int8wo-bf16", "int8wo-fp32", "int8dyn")
COMPILED = ("fp32-compiled", "bf16-compiled", "int8dyn-compiled", "int8wo-bf16-compiled")
INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def machine() -> str:
    from gpt2kit.device import cpu_features

    f = cpu_features()
    flags = " ".join(
        k for k in ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile") if f.get(k)
    )
    return (
        f"machine: {f.get('cpu_name') or 'CPU'}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, kernels {torch.backends.cpu.get_cpu_capability()}), "
        f"flags {flags or 'none'}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


def best_seconds(fn: Callable[[], object], *, calls: int, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def bandwidth(repeats: int) -> float:
    """Read bandwidth in bytes/s: the best sum of a 512 MiB float32 tensor."""
    x = torch.ones(128 * 2**20)
    return x.numel() * 4 / best_seconds(x.sum, calls=2, repeats=repeats)


def token_bytes(position: int) -> dict[str, int]:
    """Bytes one batch-1 decode token of gpt2 124M reads, per format."""
    c = GPT2Config.from_name("gpt2")
    blocks = c.n_layer * sum(i * o for i, o in list(LINEARS.values())[:4])
    head = c.vocab_size * c.n_embd
    small = c.n_layer * (sum(o for _, o in list(LINEARS.values())[:4]) + 4 * c.n_embd) + 2 * c.n_embd
    scales = c.n_layer * sum(o for _, o in list(LINEARS.values())[:4])  # one per output channel
    kv = 2 * c.n_layer * position * c.n_embd
    return {
        "fp32": 4 * (blocks + head + small + kv),
        "bf16": 2 * (blocks + head + small + kv),
        "int8, fp32 lm_head": blocks + 4 * (scales + head + small + kv),
        "int8, bf16 lm_head": blocks + 2 * (scales + head + small + kv),
        "int8 (lm_head int8), fp32 act": blocks + head + 4 * (scales + c.vocab_size + small + kv),
        "int8 (lm_head int8), bf16 act": blocks + head + 2 * (scales + c.vocab_size + small + kv),
    }


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    return (w / scale[:, None]).round().to(torch.int8), scale


def eager_candidate(name: str, w: torch.Tensor, b: torch.Tensor) -> tuple[Callable, list, int]:
    """(fn(x, weight), weights in that format, bytes per weight element)."""
    if name in ("fp32", "bf16"):
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        return (lambda x, p: F.linear(x, p[0], p[1])), [w.to(dtype), b.to(dtype)], dtype.itemsize
    q, scale = int8_weight(w)
    if name.startswith("int8wo"):
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        return (
            (lambda x, p: torch.ops.aten._weight_int8pack_mm(x, p[0], p[1]) + p[2]),
            [q, scale.to(dtype), b.to(dtype)],
            1,
        )

    def dyn(x, p):  # per-row symmetric activation scale, int8 x int8 -> int32, rescale
        s = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        xq = (x / s).round().to(torch.int8)
        return torch._int_mm(xq, p[0]).float() * s * p[1] + p[2]

    return dyn, [q.t(), scale, b], 1  # (K, N), column-major: the (N, K) weight as stored


class Stack(torch.nn.Module):
    """`copies` Linears of one shape, each applied to the same row: one GEMM each, so a
    compiled stack streams every copy's weights from memory, as a step's layers do."""

    def __init__(self, lins: list[torch.nn.Module]) -> None:
        super().__init__()
        self.lins = torch.nn.ModuleList(lins)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [lin(x) for lin in self.lins]


def compiled_candidate(name: str, w: torch.Tensor, b: torch.Tensor, copies: int) -> Callable:
    """`copies` of the Linear compiled as the step compiles it (torchao's scheme, inductor's
    options, int8 in the step's u8s8 form); returns a function running all of them."""
    from gpt2kit.model.quantize import int8_export_form

    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    lins = []
    for _ in range(copies):
        lin = torch.nn.Linear(w.shape[1], w.shape[0]).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(w + 1e-3 * torch.randn_like(w))  # distinct copies: no folding into one
            lin.bias.copy_(b)
        lins.append(lin.eval())
    stack = Stack(lins)
    if name.startswith("int8"):
        import torchao.quantization as ao

        config = (
            ao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
            if name.startswith("int8dyn")
            else ao.Int8WeightOnlyConfig(set_inductor_config=False)
        )
        ao.quantize_(stack, config)
    x = torch.randn(1, w.shape[1], dtype=dtype)
    with int8_export_form(), torch.no_grad():
        fn = torch.compile(stack, options=INDUCTOR, fullgraph=True)
        fn(x)
    return lambda: fn(x)


def time_linear(name: str, K: int, N: int, *, repeats: int) -> tuple[float, int]:
    """(seconds per call, weight bytes) for candidate `name` on a (K -> N) Linear at batch 1."""
    torch.manual_seed(0)
    w, b = torch.randn(N, K) * 0.02, torch.randn(N) * 0.02
    if name in COMPILED:
        size = 1 if name.startswith("int8") else (2 if "bf16" in name else 4)
        copies = min(64, max(1, math.ceil(STREAM_BYTES / (N * K * size))))
        fn = compiled_candidate(name, w, b, copies)
        with torch.no_grad():
            return best_seconds(fn, calls=3, repeats=repeats) / copies, N * K * size
    fn, first, size = eager_candidate(name, w, b)
    copies = max(1, math.ceil(STREAM_BYTES / (N * K * size)))
    params = [first] + [[t.clone() for t in first] for _ in range(copies - 1)]
    dtype = first[-1].dtype if name != "int8dyn" else torch.float32
    x = torch.randn(1, K, dtype=dtype)
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % copies
        return fn(x, params[state["i"]])

    with torch.no_grad():
        return best_seconds(call, calls=max(copies, 20), repeats=repeats), N * K * size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--level", default=None, help="run in a child process at this gpt2kit.device.CPU_LEVELS level"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--position", type=int, default=64, help="KV cache positions read per token")
    parser.add_argument(
        "--compiled", action="store_true", help="also the inductor-compiled candidates (a compile each)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="Linears to time (default: all)")
    parser.add_argument("--candidates", nargs="*", default=None, help="candidates to time (default: all)")
    args = parser.parse_args()
    if args.level:
        from gpt2kit.device import CPU_LEVELS

        argv = [a for a in sys.argv[1:] if a not in ("--level", args.level)]
        env = os.environ | CPU_LEVELS[args.level]
        sys.exit(subprocess.run([sys.executable, __file__, *argv], env=env).returncode)
    print(machine())
    bw = bandwidth(args.repeats)
    print(f"read bandwidth: {bw / 1e9:.1f} GB/s (best of {args.repeats} sums of 512 MiB float32)")
    print(
        f"\nbytes per decode token (gpt2 124M, batch 1, KV cache at position {args.position}), and the bound:"
    )
    for fmt, n in token_bytes(args.position).items():
        print(f"  {fmt:32} {n / 1e6:7.1f} MB   {bw / n:6.1f} tokens/s")
    candidates = args.candidates or [*EAGER, *(COMPILED if args.compiled else ())]
    names = args.only or list(LINEARS)
    print(f"\none Linear at batch 1: microseconds per call, GB/s of weights read, % of {bw / 1e9:.1f} GB/s")
    print(f"{'':12}" + "".join(f"{c:>26}" for c in candidates))
    totals = dict.fromkeys(candidates, 0.0)
    for name in names:
        K, N = LINEARS[name]
        cells = []
        for c in candidates:
            try:
                s, nbytes = time_linear(c, K, N, repeats=args.repeats)
            except Exception as e:  # a kernel this level lacks: say so, keep going
                cells.append(f"{'n/a: ' + type(e).__name__:>26}")
                totals[c] = math.nan
                continue
            totals[c] += s * (1 if name == "lm_head" else 12)
            cells.append(f"{s * 1e6:9.1f}us {nbytes / s / 1e9:5.1f}GB/s {100 * nbytes / s / bw:4.0f}%")
        print(f"{name:12}" + "".join(f"{cell:>26}" for cell in cells))
    if not args.only:
        print(f"{'step (12x+head)':12}" + "".join(f"{t * 1e3:21.2f} ms  " for t in totals.values()))
        print(f"{'= tokens/s':12}" + "".join(f"{1 / t:22.1f}    " for t in totals.values()))


if __name__ == "__main__":
    main()
