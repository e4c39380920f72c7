"""bf16 autocast against float32 on this CPU: the loss-curve cost and the speed, same recipe, same steps.

The quick start's CPU recipe (`gpt2kit.training.quickstart.quickstart_config`, its data: Shakespeare with
a 4096-token BPE) trains --steps optimizer steps twice from the same seed, once with
`dtype = "float32"` and once with `dtype = "bfloat16"` (what `dtype = "auto"` picks on CPUs with
AVX512-BF16 or AMX). Both see the same batches, so the loss per step compares directly
(it does not depend on the machine's load); each final model is scored on the whole val
split (bits per byte). Tokens/s are the median of the logged intervals of each run, taken one
after the other: noisy when others share the CPU.

    flock /tmp/gpt2kit-cpu.lock .venv/bin/python benchmarks/bench_train_bf16.py
    .venv/bin/python benchmarks/bench_train_bf16.py --steps 100   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench_time_to_loss import cpu_description
from gpt2kit.data.prepare import prepare
from gpt2kit.data.shards import TokenData
from gpt2kit.evals.split_loss import split_loss
from gpt2kit.model import GPT2
from gpt2kit.training.loop import train
from gpt2kit.training.quickstart import TOKENIZER, VAL_FRACTION, quickstart_config

LOG_EVERY = 10


def run(dtype: str, data_dir: Path, data: TokenData, steps: int, run_dir: Path) -> dict:
    cfg = quickstart_config(data_dir, device="cpu", max_steps=steps, minutes=0.0).replace(
        dtype=dtype, log_interval=LOG_EVERY, eval_interval=10**9, ckpt_interval=10**9
    )
    records: list[dict] = []
    result = train(cfg, run_dir, on_event=lambda e: records.append(e) if "tokens_per_s" in e else None)
    assert result.final_dir is not None
    scores = split_loss(GPT2.from_pretrained(result.final_dir), data, "val", block_size=cfg.block_size)
    rates = sorted(r["tokens_per_s"] for r in records[1:])  # the first interval includes start-up
    return {
        "dtype": dtype,
        "losses": {r["step"]: r["loss"] for r in records},
        "tokens_per_s": round(rates[len(rates) // 2]),
        "val_loss": scores["loss"],
        "bits_per_byte": scores["bits_per_byte"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--data", default="runs/bench-time-to-loss/data", help="prepared once, reused")
    args = p.parse_args()
    data_dir = Path(args.data)
    if not (data_dir / "meta.json").is_file():
        prepare(["shakespeare"], data_dir, tokenizer=TOKENIZER, val_fraction=VAL_FRACTION)
    data = TokenData.open(data_dir)
    print(f"machine: {cpu_description()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="gpt2kit-bf16-") as tmp:
        fp32, bf16 = (run(d, data_dir, data, args.steps, Path(tmp) / d) for d in ("float32", "bfloat16"))
    steps = sorted(fp32["losses"])
    print("step   float32  bfloat16  difference")
    for s in steps[:: max(1, len(steps) // 10)] + ([steps[-1]] if len(steps) % 10 != 1 else []):
        a, b = fp32["losses"][s], bf16["losses"][s]
        print(f"{s:5d}  {a:8.4f}  {b:8.4f}  {b - a:+.4f}")
    diffs = [bf16["losses"][s] - fp32["losses"][s] for s in steps]
    late = diffs[len(diffs) // 2 :]  # the second half: past the fast, noisy start
    summary = {
        "steps": args.steps,
        "float32_tokens_per_s": fp32["tokens_per_s"],
        "bfloat16_tokens_per_s": bf16["tokens_per_s"],
        "speed_ratio": round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 3),
        "mean_loss_difference_second_half": round(sum(late) / len(late), 4),
        "max_abs_loss_difference": round(max(abs(d) for d in diffs), 4),
        "float32_bits_per_byte": round(fp32["bits_per_byte"], 4),
        "bfloat16_bits_per_byte": round(bf16["bits_per_byte"], 4),
    }
    print(json.dumps(summary))
    print(
        f"bf16 / fp32: {summary['speed_ratio']:.2f}x tokens/s; train loss per step "
        f"{summary['mean_loss_difference_second_half']:+.4f} nats (mean, second half); val after "
        f"{args.steps} steps {bf16['bits_per_byte']:.4f} vs {fp32['bits_per_byte']:.4f} bits/byte"
    )


if __name__ == "__main__":
    main()
