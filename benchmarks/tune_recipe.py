"""Screen changes to the quick start's CPU recipe: val bits/byte after the same short time budget.

Each variant is a JSON object of TrainConfig keys applied on top of the recipe
(`gpt2kit.training.quickstart.quickstart_config`); `{"nanogpt": true, ...}` starts from
bench_time_to_loss.py's nanoGPT recipe instead. Every variant trains for --minutes (the
schedule follows the clock) on the quick start's data and is scored on the whole val split,
one after the other, so compare variants of one invocation only (the machine's load moves
the figures between invocations). With --steps N each variant trains N steps instead (its
schedule over the steps): a comparison that doesn't depend on the load, for variants whose
steps cost the same. This is how the quick start's recipe was chosen
(benchmarks/README.md).

    flock /tmp/gpt2kit-cpu.lock .venv/bin/python benchmarks/tune_recipe.py --minutes 2 \\
        '{}' '{"muon_lr": 0.04}' '{"lr": 4e-3}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench_time_to_loss import cpu_description, nanogpt_recipe, run
from gpt2kit.data.prepare import prepare
from gpt2kit.data.shards import TokenData
from gpt2kit.training.quickstart import TOKENIZER, VAL_FRACTION, quickstart_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="JSON objects of TrainConfig keys, e.g. '{\"lr\": 4e-3}'")
    p.add_argument("--minutes", type=float, default=2.0, help="each variant's time budget")
    p.add_argument(
        "--steps", type=int, default=0, help="a number of steps instead of a time budget (load-independent)"
    )
    p.add_argument("--data", default="runs/bench-time-to-loss/data", help="prepared once, reused")
    args = p.parse_args()
    try:
        variants = [json.loads(v) for v in args.variants]
    except json.JSONDecodeError as e:
        p.error(f"a variant is not JSON ({e}); e.g. '{{\"lr\": 4e-3}}'")
    data_dir = Path(args.data)
    if not (data_dir / "meta.json").is_file():
        prepare(["shakespeare"], data_dir, tokenizer=TOKENIZER, val_fraction=VAL_FRACTION)
    data = TokenData.open(data_dir)
    print(f"machine: {cpu_description()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    minutes = 0.0 if args.steps else args.minutes
    recipe = quickstart_config(data_dir, device="cpu", max_steps=args.steps or 10**9, minutes=minutes)
    with tempfile.TemporaryDirectory(prefix="gpt2kit-tune-") as tmp:
        for i, variant in enumerate(variants):
            changes = dict(variant)
            base = nanogpt_recipe(data_dir, recipe, "cpu") if changes.pop("nanogpt", False) else recipe
            r = run(base.replace(**changes), minutes, Path(tmp) / f"run{i}", data, steps=args.steps or 10**9)
            print(json.dumps({"variant": variant, **r}), flush=True)


if __name__ == "__main__":
    main()
