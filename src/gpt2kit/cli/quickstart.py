"""`gpt2kit quickstart`: Shakespeare to a trained GPT-2 and samples, in one command."""

from __future__ import annotations

import argparse
import sys

EXAMPLE = """examples:
  gpt2kit quickstart                          # 5 minutes of training (--minutes), then samples
  gpt2kit quickstart --minutes 2 --out runs/qs2
  gpt2kit quickstart --max-steps 20 --out /tmp/qs   # a smoke test: 20 steps
"""


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter
    from gpt2kit.cli._common import add_device_flag

    p = sub.add_parser(
        "quickstart",
        help="prepare Shakespeare, train a small GPT-2 for a few minutes, print samples",
        description=(
            "The first thing to run. Prepares Shakespeare's plays with a freshly trained 4096-token "
            "byte-level BPE, trains a small GPT-2 for --minutes (bigger on a GPU), then prints the "
            "val loss (nats/token and bits per byte) and samples, and how to continue. OUT holds "
            "the run (config.toml, metrics.jsonl, checkpoints, final/) and the data (OUT/data)."
        ),
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="runs/quickstart", help="run directory to create")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=None, help="train exactly this many steps instead")
    add_device_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.cli.train import Progress
    from gpt2kit.training.quickstart import quickstart

    def stage(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    progress = Progress(enabled=sys.stderr.isatty())
    try:
        result = quickstart(
            args.out,
            minutes=args.minutes,
            max_steps=args.max_steps,
            device=args.device,
            on_stage=stage,
            on_event=progress.on_event,
        )
    finally:
        progress.close()
    print()
    for prompt, text in result.samples.items():
        print(f"--- sample: {prompt!r} ---")
        print(text)
        print()
    bpb = f"{result.bits_per_byte:.3f}" if result.bits_per_byte is not None else "n/a"
    print(
        f"val loss {result.val_loss:.4f} nats/token = {bpb} bits/byte "
        f"(whole val split, {result.val_tokens:,} tokens) after {result.steps} steps, "
        f"{result.train_seconds / 60:.1f} min on {result.device}"
    )
    print(f"the run is in {result.run_dir} (loss curves: gpt2kit plot {result.run_dir})")
    print("continue with:")
    print(f"  gpt2kit generate --model {result.final_dir} --prompt 'ROMEO:' --top-k 40 --temperature 0.8")
    print(f"  gpt2kit serve --model {result.final_dir}")
    cfg = result.config
    longer = f"--set max_steps={2 * cfg.max_steps}"
    if cfg.max_minutes:  # the run's clock continues: a longer budget, and room for the steps
        longer = f"--set max_minutes={2 * cfg.max_minutes:g} {longer}"
    print(f"  gpt2kit train --resume {result.run_dir} {longer}   # train as long again")
    return 0
