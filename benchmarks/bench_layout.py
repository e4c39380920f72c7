"""The decode weight layout (`use_decode_layout`) against torch's default, on eager decode steps.

One-token decoding is a matrix-vector product per weight. `gpt2kit.model.gpt2.use_decode_layout`
stores each Linear/Embedding weight [in, out] in memory (values, shapes and logits
unchanged); the engine applies it on CPU. This times `GPT2.decode_step` of a random gpt2 124M
at batch 1 in float32, the same model in both layouts, taking turns (`--repeats` rounds,
best of each), and prints how far apart their logits are.

    python benchmarks/bench_layout.py
    python benchmarks/bench_layout.py --steps 64 --repeats 5 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench_generate import cpu_flags, cpu_name  # the sibling script (python puts this folder on sys.path)
from gpt2kit import GPT2, GPT2Config
from gpt2kit.model.gpt2 import use_decode_layout


def steps_per_second(model: GPT2, steps: int) -> tuple[float, torch.Tensor]:
    """Decode `steps` tokens at positions 0, 1, ... from an empty cache; (steps/s, last logits)."""
    c = model.config
    shape = (1, c.n_head, steps, c.n_embd // c.n_head)
    dtype = model.wte.weight.dtype
    k = [torch.zeros(shape, dtype=dtype) for _ in range(c.n_layer)]
    v = [torch.zeros(shape, dtype=dtype) for _ in range(c.n_layer)]
    idx = torch.tensor([[464]])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for pos in range(steps):
            logits = model.decode_step(idx, torch.tensor([pos]), k, v)
    return steps / (time.perf_counter() - t0), logits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    print(
        f"machine: {cpu_name()}, flags {' '.join(cpu_flags())}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    torch.manual_seed(0)
    default = GPT2(GPT2Config.from_name("gpt2")).to(getattr(torch, args.dtype)).eval()
    laid_out = copy.deepcopy(default)
    use_decode_layout(laid_out)
    models = {"torch's layout [out, in]": default, "decode layout [in, out]": laid_out}
    best = dict.fromkeys(models, 0.0)
    logits = {}
    steps_per_second(default, 2)  # warm-up
    for _ in range(args.repeats):
        for name, model in models.items():
            rate, logits[name] = steps_per_second(model, args.steps)
            best[name] = max(best[name], rate)
    first, second = logits.values()
    diff = (first.float() - second.float()).abs().max().item()
    print(
        f"gpt2 124M {args.dtype}, batch 1, {args.steps} eager decode steps, best of {args.repeats}; "
        f"logits differ by at most {diff:.2g} ({'bit-identical' if diff == 0 else 'not bit-identical'})"
    )
    base = best["torch's layout [out, in]"]
    for name, rate in best.items():
        print(f"{name:28} {rate:7.1f} steps/s  {rate / base:5.2f}x")


if __name__ == "__main__":
    main()
