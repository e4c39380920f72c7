"""Time to loss: nanoGPT's CPU recipe against gpt2kit's quick-start recipe, same data, same model.

What is compared is the recipe, the way the GPT-2 speedruns compare: the lowest validation loss
for the time spent, and the time to reach a loss.

- Data: the quick start's (Shakespeare's plays, a 4096-token byte-level BPE trained on the
  train split, 10% of the plays held out), prepared once into --data.
- Model: the quick start's CPU shape (n_layer, n_head, n_embd) for both recipes.
- nanoGPT's recipe: its README's CPU run of config/train_shakespeare_char.py: AdamW, lr 1e-3
  with 100 warmup steps and a cosine to 1e-4, betas (0.9, 0.99), weight decay 0.1, clip 1.0,
  batch 12 x block 64, float32 (nanoGPT uses no autocast on CPU), no dropout, no compile.
- gpt2kit's recipe: `gpt2kit.training.quickstart.quickstart_config` on this device, as `gpt2kit
  quickstart` trains.

Both run in `gpt2kit.training.loop.train` (the loop bench_train.py measured at 0.99x the nanoGPT loop's
step speed), so only the recipe differs, and both get the same kind of budget: `max_minutes`,
which their schedules follow (nanoGPT's cosine then ends exactly when the time does, which its
own max_iters could only approximate). Each final model is scored on the whole val split
(bits per byte, gpt2kit.evals.split_loss). Runs, one after the other:

1. nanoGPT's recipe for --minutes, then gpt2kit's for --minutes: val loss at equal wall time;
2. gpt2kit's again with budgets of --fractions x --minutes: the wall time gpt2kit needs to
   reach nanoGPT's final val loss (interpolated, log-linear in time, between the two budgets
   whose losses bracket it), as a ratio of nanoGPT's --minutes.

    flock /tmp/gpt2kit-cpu.lock .venv/bin/python benchmarks/bench_time_to_loss.py
    .venv/bin/python benchmarks/bench_time_to_loss.py --minutes 2 --fractions 0.5   # a quicker look
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from gpt2kit.data.prepare import prepare
from gpt2kit.data.shards import TokenData
from gpt2kit.device import cpu_bf16, cpu_features
from gpt2kit.evals.split_loss import split_loss
from gpt2kit.model import GPT2
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.loop import train
from gpt2kit.training.quickstart import TOKENIZER, VAL_FRACTION, quickstart_config


def cpu_description() -> str:
    """The CPU and the flags that decide which precision pays on it (gpt2kit.device's probes)."""
    f = cpu_features()
    flags = " ".join(sorted(k for k, v in f.items() if v is True and k.startswith(("avx512", "amx"))))
    bf16 = cpu_bf16()
    return (
        f"{f.get('cpu_name', platform.machine())}, {f.get('num_physical_cores', '?')} cores; "
        f"flags: {flags or 'no avx512/amx'}; bf16: {bf16 or 'emulated (float32 is faster)'}"
    )


def nanogpt_recipe(data_dir: Path, shape: TrainConfig, device: str) -> TrainConfig:
    return TrainConfig(
        data=str(data_dir),
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_embd=shape.n_embd,
        block_size=64,
        batch_size=12,
        optimizer="adamw",
        schedule="cosine",
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=100,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.1,
        grad_clip=1.0,
        dropout=0.0,
        dtype="float32",
        compile=False,
        device=device,
    )


def run(cfg: TrainConfig, minutes: float, run_dir: Path, data: TokenData, *, steps: int = 10**9) -> dict:
    """Train `cfg` for `minutes` (the schedule follows the clock; 0: for `steps` steps instead),
    score the whole val split."""
    cfg = cfg.replace(
        max_minutes=minutes,
        max_steps=steps,  # with a time budget, far more than fit: the budget ends the run
        eval_interval=10**9,  # no evaluation inside the budget: the final model is scored after it
        ckpt_interval=10**9,
        log_interval=50,
        keep_last=1,
    )
    records: list[dict] = []
    result = train(cfg, run_dir, on_event=lambda e: records.append(e) if "tokens_per_s" in e else None)
    assert result.final_dir is not None
    scores = split_loss(
        GPT2.from_pretrained(result.final_dir, device=cfg.device), data, "val", block_size=cfg.block_size
    )
    rates = sorted(r["tokens_per_s"] for r in records)
    return {
        "minutes": minutes,
        "train_s": round(result.elapsed_s, 1),
        "steps": result.step,
        "tokens_per_s": round(rates[len(rates) // 2]) if rates else None,
        "val_loss": round(scores["loss"], 4),
        "bits_per_byte": round(scores["bits_per_byte"], 4),
    }


def time_to_reach(target: float, runs: list[dict]) -> tuple[float, str]:
    """Minutes gpt2kit needs for val bits/byte <= target: (minutes, "" or "<" / ">" for a bound)."""
    points = sorted((r["minutes"], r["bits_per_byte"]) for r in runs)
    if points[0][1] <= target:
        return points[0][0], "<="
    for (t0, b0), (t1, b1) in itertools.pairwise(points):
        if b1 <= target < b0:
            w = (b0 - target) / (b0 - b1)
            return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0))), ""
    return points[-1][0], ">"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="nanoGPT's budget (and gpt2kit's first)")
    p.add_argument(
        "--fractions", default="0.5,0.35,0.25", help="gpt2kit's shorter budgets, as fractions of --minutes"
    )
    p.add_argument("--data", default="runs/bench-time-to-loss/data", help="prepared once, reused")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data)
    if not (data_dir / "meta.json").is_file():
        prepare(["shakespeare"], data_dir, tokenizer=TOKENIZER, val_fraction=VAL_FRACTION)
    data = TokenData.open(data_dir)

    ours = quickstart_config(data_dir, device=args.device, max_steps=10**9, minutes=args.minutes)
    theirs = nanogpt_recipe(data_dir, ours, args.device)
    print(f"machine: {cpu_description()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(
        f"data: {data_dir} ({data.meta['splits']['train']['tokens']:,} train / "
        f"{data.meta['splits']['val']['tokens']:,} val tokens, vocabulary {data.n_vocab}); "
        f"model: n_layer={ours.n_layer} n_head={ours.n_head} n_embd={ours.n_embd}"
    )
    for name, cfg in (("nanoGPT", theirs), ("gpt2kit", ours)):
        recipe = {
            k: getattr(cfg, k) for k in ("optimizer", "schedule", "lr", "batch_size", "block_size", "dtype")
        }
        if cfg.optimizer == "muon":
            recipe |= {"muon_lr": cfg.muon_lr, "muon_weight_decay": cfg.muon_weight_decay}
        print(f"{name} recipe: {json.dumps(recipe)}")

    results: dict[str, list[dict]] = {"nanoGPT": [], "gpt2kit": []}
    budgets = [("nanoGPT", theirs, args.minutes), ("gpt2kit", ours, args.minutes)]
    budgets += [("gpt2kit", ours, args.minutes * float(f)) for f in args.fractions.split(",") if f]
    with tempfile.TemporaryDirectory(prefix="gpt2kit-ttl-") as tmp:
        for i, (name, cfg, minutes) in enumerate(budgets):
            t0 = time.perf_counter()
            r = run(cfg, minutes, Path(tmp) / f"run{i}", data)
            results[name].append(r)
            print(
                f"  {name:8s} {minutes:5.2f} min: {r['steps']:5d} steps, {r['tokens_per_s']:,} tok/s, "
                f"val {r['val_loss']:.4f} nats/token = {r['bits_per_byte']:.4f} bits/byte "
                f"({time.perf_counter() - t0:.0f} s with start-up and scoring)",
                flush=True,
            )

    peer, full = results["nanoGPT"][0], results["gpt2kit"][0]
    minutes, bound = time_to_reach(peer["bits_per_byte"], results["gpt2kit"])
    summary = {
        "minutes": args.minutes,
        "nanogpt_bits_per_byte": peer["bits_per_byte"],
        "gpt2kit_bits_per_byte": full["bits_per_byte"],
        "bits_per_byte_ratio": round(full["bits_per_byte"] / peer["bits_per_byte"], 3),
        "gpt2kit_minutes_to_nanogpt_loss": round(minutes, 2),
        "bound": bound or None,
        "time_ratio": round(minutes / args.minutes, 3),
        "runs": results,
    }
    print(json.dumps(summary))
    print(
        f"equal wall time ({args.minutes:g} min): val bits/byte gpt2kit {full['bits_per_byte']:.3f} / "
        f"nanoGPT {peer['bits_per_byte']:.3f} = {summary['bits_per_byte_ratio']:.3f}x"
    )
    print(
        f"time to nanoGPT's {args.minutes:g}-min val loss ({peer['bits_per_byte']:.3f} bits/byte): gpt2kit "
        f"{bound}{minutes:.2f} min = {bound}{summary['time_ratio']:.2f}x nanoGPT's time (target <= 0.5x)"
    )


if __name__ == "__main__":
    main()
