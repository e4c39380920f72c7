"""`gpt2kit train`: train or fine-tune GPT-2 on prepared data; resume; one device or many (torchrun)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any

from gpt2kit.training.config import TrainConfig, toml_value

EXAMPLE = """examples:
  gpt2kit train --data data/shakespeare --out runs/shk --set n_layer=4 --set n_embd=256 --max-steps 2000
  gpt2kit train --data data/shakespeare --out runs/shk --config examples/shakespeare.toml
  gpt2kit train --data data/mytext --out runs/ft --set init_from=gpt2 --set lr=3e-5   # fine-tune
  gpt2kit train --resume runs/shk                          # continue after a crash or Ctrl-C
  gpt2kit train --resume runs/shk --set max_steps=4000     # train longer
  torchrun --nproc_per_node 2 -m gpt2kit train --data data/shakespeare --out runs/ddp --set grad_accum=2
  torchrun --nproc_per_node 8 -m gpt2kit train --data data/owt --out runs/xl --set parallel=fsdp --set init_from=scratch:gpt2-xl

  gpt2kit train --data data/shakespeare --out runs/m --set optimizer=muon --set schedule=wsd --set max_minutes=5
"""

# Plain flags for the most used keys: flag name -> config key.
FLAGS = {"max_steps": int, "batch_size": int, "lr": float, "device": str, "seed": int}


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter

    p = sub.add_parser(
        "train",
        help="train or fine-tune a GPT-2 on prepared data",
        description=(
            "Train a GPT-2 from scratch (or fine-tune one: --set init_from=MODEL) on data made by "
            "gpt2kit prepare. Settings come from defaults, then --config FILE.toml, then plain flags "
            "and --set key=value. Writes RUN_DIR/config.toml, metrics.jsonl, ckpt-NNNNNN/ checkpoints "
            "and, at the end, RUN_DIR/final/ (a model directory for gpt2kit generate / transformers). "
            "Ctrl-C saves a checkpoint; --resume continues bit-for-bit."
        ),
        epilog=EXAMPLE + "\n" + keys_help(),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", help="prepared data directory (gpt2kit prepare --out DIR)")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.add_argument("--config", help="TOML file of settings (flat key = value lines)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (repeatable), e.g. --set lr=3e-4",
    )
    for key, kind in FLAGS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None, help=f"same as --set {key}=...")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.set_defaults(func=run)


def keys_help(width: int = 100) -> str:
    """The --set keys with their defaults and help, from TrainConfig's fields."""
    settings = [(f"{key} = {toml_value(default)}", help) for key, default, help in TrainConfig.settings()]
    column = 2 + max(len(setting) for setting, _ in settings) + 2
    lines = ["keys (--set key=value, or key = value lines in --config FILE.toml; docs/training.md has more):"]
    for setting, help in settings:
        first = f"  {setting}".ljust(column)
        lines += textwrap.wrap(
            help, width, initial_indent=first, subsequent_indent=" " * column, break_on_hyphens=False
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from gpt2kit.errors import ConfigError
    from gpt2kit.training.loop import resume_config, train

    overrides = list(args.overrides)
    overrides += [
        f"{key}={toml_value(getattr(args, key))}" for key in FLAGS if getattr(args, key) is not None
    ]
    if args.resume:
        if args.out or args.config:
            raise ConfigError("--resume continues a run with its saved config.toml; drop --out/--config")
        if args.data:
            overrides.append(f"data={toml_value(args.data)}")
        cfg = resume_config(args.resume, overrides)
        run_dir = args.resume
    else:
        if not args.data or not args.out:
            raise ConfigError("pass --data DATA_DIR and --out RUN_DIR (or --resume RUN_DIR)")
        cfg = TrainConfig.load(args.config, overrides=[*overrides, f"data={toml_value(args.data)}"])
        run_dir = args.out

    if os.environ.get("RANK", "0") == "0":
        print(cfg.to_toml(), end="", file=sys.stderr)  # the full resolved config, once per run
    progress = Progress(enabled=not args.no_progress)
    try:
        result = train(cfg, run_dir, resume=bool(args.resume), on_event=progress.on_event)
    finally:
        progress.close()
    if result.interrupted:
        print(
            f"interrupted at step {result.step}; checkpoint {result.last_checkpoint}\n"
            f"continue with: gpt2kit train --resume {run_dir}",
            file=sys.stderr,
        )
        return 130
    if progress.main:
        print(f"done: step {result.step}, model in {result.final_dir}")
        print(f"try: gpt2kit generate --model {result.final_dir} --prompt 'ROMEO:' --top-k 40")
    return 0


class Progress:
    """Draws the training progress bar from the events `train` emits (main process only)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.main = False
        self.config_printed = False

    def on_event(self, e: dict[str, Any]) -> None:
        from tqdm import tqdm

        self.main = True
        kind = e.get("kind", "train")
        if kind == "start":
            print(
                f"training {e['parameters']:,} parameters on {e['device']} x{e['world_size']}, "
                f"{e['tokens_per_step']:,} tokens/step, steps {e['step']}..{e['max_steps']}"
                + (f" or {e['max_minutes']:g} min" if e.get("max_minutes") else ""),
                file=sys.stderr,
            )
            if self.enabled:
                self.bar = tqdm(total=e["max_steps"], initial=e["step"], unit="step", dynamic_ncols=True)
            return
        if kind == "train":
            line = (
                f"loss {e['loss']:.4f} | lr {e['lr']:.2e} | {e['tokens_per_s']:,.0f} tok/s"
                + (f" | mfu {100 * e['mfu']:.1f}%" if "mfu" in e else "")
                + f" | eta {_duration(e['eta_s'])}"
            )
            if self.bar is not None:
                self.bar.n = e["step"]
                self.bar.set_postfix_str(line, refresh=True)
            else:
                print(f"step {e['step']} | {line}", file=sys.stderr, flush=True)
            return
        text = {
            "eval": lambda: (
                f"step {e['step']}: train loss {e['train_loss']:.4f}, val loss "
                + (f"{e['val_loss']:.4f}" if e.get("val_loss") is not None else "n/a")
            ),
            "checkpoint": lambda: f"step {e['step']}: saved {e['path']}",
            "final": lambda: f"step {e['step']}: final model in {e['path']}",
        }.get(kind)
        if text is not None:
            (self.bar.write if self.bar is not None else lambda s: print(s, file=sys.stderr))(text())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
