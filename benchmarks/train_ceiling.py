"""How much faster could any fp32 CPU training loop be? The nanoGPT-style step, profiled.

Runs `bench_train.py`'s nanoGPT-style model and step (4 layers, n_embd 256, vocab 257,
batch 16 x 128, AdamW, clip 1.0) under `torch.profiler` and, in the same process, a large
square SGEMM. Prints each kind of work's share of the step, the matrix products' rate
inside the step against the square product's, and the speed-up any loop could get if the
non-GEMM work cost nothing.

    python benchmarks/train_ceiling.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import profile

from bench_train import NanoGPT  # the sibling script (python puts this folder on sys.path)

ELEMENTWISE = {
    "aten::gelu",
    "aten::gelu_backward",
    "aten::native_layer_norm",
    "aten::native_layer_norm_backward",
    "aten::add",
    "aten::add_",
    "aten::copy_",
    "aten::sum",
    "aten::mul",
    "aten::cat",
}


def best_time(fn: Callable[[], object], repeats: int = 8) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    square = 2 * n**3 / best_time(lambda: torch.mm(a, b)) / 1e9

    torch.manual_seed(0)
    vocab, block, n_layer, n_head, n_embd, batch = 257, 128, 4, 4, 256, 16
    model = NanoGPT(vocab, block, n_layer, n_head, n_embd)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (batch, block))
    y = torch.randint(0, vocab, (batch, block))

    def step() -> float:
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    tokens = batch * block
    seconds = best_time(step, 15)
    with profile() as prof:
        for _ in range(5):
            step()
    self_time = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_time.values())
    gemm = (self_time.get("aten::mm", 0) + self_time.get("aten::addmm", 0)) / total
    attention = sum(v for k, v in self_time.items() if "scaled_dot_product" in k) / total
    elementwise = sum(v for k, v in self_time.items() if k in ELEMENTWISE) / total
    flops = 6 * (n_layer * 12 * n_embd * n_embd + vocab * n_embd) * tokens  # the linear layers

    print(
        f"square sgemm {n}^3: {square:.0f} GFLOP/s; step {seconds * 1e3:.0f} ms = {tokens / seconds:,.0f} tok/s"
    )
    print(
        f"profile shares: GEMM {gemm:.0%}, attention {attention:.0%}, elementwise/norm/reductions "
        f"{elementwise:.0%}, rest {1 - gemm - attention - elementwise:.0%}"
    )
    print(f"GEMM rate inside the step: {flops / (seconds * gemm) / 1e9:.0f} GFLOP/s")
    print(
        f"upper bound if everything but GEMM+attention cost nothing: {1 / (gemm + attention):.2f}x; "
        f"if elementwise only: {1 / (1 - elementwise):.2f}x"
    )


if __name__ == "__main__":
    main()
