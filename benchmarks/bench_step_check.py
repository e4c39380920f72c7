"""What the compiled step's check allows and costs (`gpt2kit/model/compiled/check.py`).

1. tolerances: for each precision, a correct compiled step of a 2-layer, 768-wide GPT-2
   (vocabulary 50257, 256 positions, random weights) against eager `decode_step`: the
   probe's error (max |dlogit| / the eager logits' scale) over 5 seeds, and over 32 greedy
   decode steps after a 100-token prompt, with how many greedy tokens agree. The bounds in
   `TOLERANCES` are set from these with margin. Each precision builds a step (minutes).
2. cost: the probe on gpt2 124M (random weights), with the eager step standing in for the
   compiled one (which is faster), 1 thread: CPU and wall seconds.
3. guard: `Weights.unchanged()` on gpt2 124M's 148 tensors, microseconds per call (it runs
   at every decode call).

    python benchmarks/bench_step_check.py                       # all three
    python benchmarks/bench_step_check.py --skip-tolerances     # 2 and 3 only (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_generate import machine_line
from gpt2kit import GPT2, GPT2Config
from gpt2kit.model.compiled.build import build_library, load_library
from gpt2kit.model.compiled.check import TOLERANCES, check, precision_of
from gpt2kit.model.compiled.runtime import CompiledStep, Weights
from gpt2kit.model.gpt2 import use_decode_layout
from gpt2kit.model.quantize import quantize_int8


def wide_model(precision: str) -> GPT2:
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=12, n_embd=768, vocab_size=50257, n_positions=256)).eval()
    if precision in ("bfloat16", "int8-bf16"):
        model = model.to(torch.bfloat16)
    if precision.startswith("int8"):
        quantize_int8(model)
    use_decode_layout(model)
    return model


def decode_error(model: GPT2, step, *, steps: int = 32, prompt: int = 100) -> tuple[float, int]:
    """Worst relative logit error over `steps` greedy steps (eager and compiled fed the same
    cache), and how many greedy tokens agreed."""
    cfg, dtype = model.config, model.wte.weight.dtype
    shape = (1, cfg.n_head, cfg.n_positions, cfg.head_size)
    k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
    v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    worst, agree = 0.0, 0
    with torch.inference_mode():
        logits = model.logits(model.prefill(ids, k, v)[:, -1])
        pos = torch.tensor([prompt])
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            want = model.decode_step(token, pos, [t.clone() for t in k], [t.clone() for t in v]).float()
            got = step(token, pos, k, v).float()
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            agree += int(got.argmax() == want.argmax())
            logits, pos = want, pos + 1
    return worst, agree


def tolerances(precisions: list[str]) -> None:
    for precision in precisions:
        model = wide_model(precision)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            library = build_library(model, 4, Path(tmp), lambda message: None)
            built = time.perf_counter() - t0
            runner = load_library(library, torch.device("cpu"))
            step = CompiledStep(model, runner, slots=4, max_len=256, library=library, weights=Weights(model))
            verdicts = [check(model, step, seed=s) for s in range(5)]
            worst, agree = decode_error(model, step)
        name = precision_of(model)
        print(
            f"{precision:10s} ({name}): probe error max {max(v.error for v in verdicts):.2g} "
            f"(seeds {', '.join(f'{v.error:.2g}' for v in verdicts)}), greedy tokens off "
            f"{sum(v.tokens_off for v in verdicts)}; decode error max {worst:.2g}, {agree}/32 greedy "
            f"tokens equal; bound {TOLERANCES[name]:g}; build {built:.0f} s"
        )


class Eager:
    """The eager decode step standing in for a compiled one (same interface)."""

    slots = 8

    def __init__(self, model: GPT2) -> None:
        self.model = model

    def __call__(self, *args):
        return self.model.decode_step(*args)


def cost_and_guard() -> None:
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = GPT2(GPT2Config()).eval().to(dtype)
        use_decode_layout(model)
        check(model, Eager(model))
        cpu, wall = [], []
        for _ in range(3):
            c0, w0 = time.process_time(), time.perf_counter()
            check(model, Eager(model))
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        print(f"probe, gpt2 124M {dtype}, 1 thread: cpu {min(cpu):.2f} s, wall {min(wall):.2f} s (best of 3)")
    weights = Weights(model)
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(500):
            weights.unchanged()
        runs.append((time.perf_counter() - t0) / 500 * 1e6)
    print(f"guard, gpt2 124M's 148 tensors: {statistics.median(runs):.0f} us per call (median of 5 x 500)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "int8", "int8-bf16"])
    ap.add_argument("--skip-tolerances", action="store_true")
    args = ap.parse_args()
    print(machine_line())
    if not args.skip_tolerances:
        tolerances(args.precisions)
    cost_and_guard()


if __name__ == "__main__":
    main()
