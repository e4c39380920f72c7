"""Does compiling the decode step pay for a model of this size? Eager against compiled decode.

A random model of the quick start's shape (4 layers, width 128, 4 heads, vocabulary 4096,
context 128: 1.3M parameters) or gpt2 124M, in the given dtype, decodes through
`generate()` eagerly (`compile=False`) and with its compiled step (built first with
`compile=True`, then `compile=None` finds it saved), at batch 1 and 8. Decode tokens/s =
rows x (new - 1) / (time of a `new`-token run - time of a 1-token run), best of 3. What
`gpt2kit serve` decides from is in docs/serving.md ("The compiled decode step").

    python benchmarks/bench_compile_pays.py quick bfloat16 2     # shape, dtype, torch threads
    python benchmarks/bench_compile_pays.py gpt2 float32 2
"""

from __future__ import annotations

import sys
import time

import torch

from gpt2kit import GPT2, GPT2Config, generate


def main() -> None:
    shape, dtype, threads = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    if shape == "quick":
        config = GPT2Config(vocab_size=4096, n_positions=128, n_embd=128, n_layer=4, n_head=4)
    else:
        config = GPT2Config()
    torch.manual_seed(0)
    model = GPT2(config).to(dtype).eval()
    print("parameters", sum(p.numel() for p in model.parameters()) / 1e6, "M", flush=True)
    new = 64 if shape == "quick" else 32

    def rate(batch: int, compile: bool | None) -> float:
        prompts = [[1 + i] * 16 for i in range(batch)]

        def run(n: int) -> float:
            t = time.perf_counter()
            generate(model, prompts, max_new_tokens=n, eos_token_id=-1, compile=compile)
            return time.perf_counter() - t

        run(4)  # warm-up
        best = 0.0
        for _ in range(3):
            t1, tn = run(1), run(new)
            best = max(best, batch * (new - 1) / (tn - t1))
        return best

    t = time.perf_counter()
    generate(model, [[1]], max_new_tokens=2, compile=True)
    print("build (or load) s", round(time.perf_counter() - t, 1), flush=True)
    for batch in (1, 8):
        for compile in (False, None):
            name = "compiled" if compile is None else "eager"
            print(
                shape,
                sys.argv[2],
                "threads",
                threads,
                "batch",
                batch,
                name,
                round(rate(batch, compile), 1),
                flush=True,
            )


if __name__ == "__main__":
    main()
