"""The quick start: Shakespeare -> a new byte-level BPE -> a small GPT-2 trained for a few minutes.

Steps (each reuses the real pipeline, nothing demo-only):
1. `prepare(["shakespeare"], OUT/data, tokenizer="bpe:4096")` (skipped when already there);
2. pick the recipe for the device (CPU_RECIPE: a small model, Muon, bf16 where the CPU has
   it; GPU_RECIPE: bigger and compiled) and time a few steps to estimate how many fit;
3. `train(...)` into OUT with `max_minutes` = the budget: the warmup-stable-decay schedule
   follows the clock, so the learning rate reaches zero when the minutes are up;
4. score the whole val split (nats/token and bits per byte) and sample a few prompts.

>>> result = quickstart("runs/quickstart", minutes=5)  # doctest: +SKIP
>>> result.bits_per_byte  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2kit.data.shards import TokenData, read_meta
from gpt2kit.device import pick_device
from gpt2kit.errors import ConfigError, Gpt2kitError
from gpt2kit.training.checkpoint import checkpoint_dirs
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.loop import train

if TYPE_CHECKING:
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TOKENIZER = "bpe:4096"
VAL_FRACTION = 0.1  # ~4 of the 38 plays: a val loss worth reporting
PROMPTS = ("ROMEO:", "JULIET:\n", "First Citizen:")
EVALS, EVAL_ITERS = 4, 5  # few, small evaluations: the budget is for training

# The recipes, measured on a 2-core CPU for the lowest val loss in the budget
# (benchmarks/README.md); docs/training.md shows them and tests/training/test_quickstart.py checks that
# it shows these. The GPU recipe takes the CPU's optimizer and schedule to a bigger model.
CPU_RECIPE: dict[str, Any] = {
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "block_size": 128,
    "batch_size": 16,
    "optimizer": "muon",
    "lr": 4e-3,
    "muon_lr": 0.02,
    "muon_weight_decay": 0.0,
    "schedule": "wsd",
    "decay_fraction": 0.4,
    "weight_decay": 0.1,
    "dtype": "auto",
    "compile": False,
}
GPU_RECIPE: dict[str, Any] = {
    **CPU_RECIPE,
    "n_layer": 6,
    "n_head": 6,
    "n_embd": 384,
    "block_size": 256,
    "batch_size": 64,
    "compile": True,
}


@dataclass
class QuickstartResult:
    run_dir: Path
    data_dir: Path
    final_dir: Path
    device: str
    steps: int
    train_seconds: float
    val_loss: float
    bits_per_byte: float | None
    val_tokens: int
    samples: dict[str, str]
    config: TrainConfig  # what was trained (also in RUN_DIR/config.toml)


def quickstart_config(data_dir: Path, *, device: str, max_steps: int, minutes: float) -> TrainConfig:
    """The recipe for `device`, with a time budget of `minutes` (0: none) that the schedule follows.

    `max_steps` (an estimate of the steps that fit, or the exact count with minutes=0) sets the
    warmup and the evaluation, log and checkpoint intervals.
    """
    recipe = GPU_RECIPE if device.startswith("cuda") else CPU_RECIPE
    return TrainConfig(
        data=str(data_dir),
        **recipe,
        max_steps=max_steps,
        max_minutes=minutes,
        warmup_steps=min(100, max(1, max_steps // 20)),
        eval_interval=max(1, max_steps // EVALS),
        eval_iters=EVAL_ITERS,
        log_interval=max(1, min(10, max_steps // 50)),
        ckpt_interval=max(1, max_steps // 2),
        keep_last=1,
        device=device,
    )


def calibrate_steps(cfg: TrainConfig, seconds: float) -> int:
    """How many optimizer steps of `cfg` fit in `seconds`, from a few timed steps."""
    with tempfile.TemporaryDirectory(prefix="gpt2kit-calibrate-") as tmp:
        timing = cfg.replace(
            max_steps=8, log_interval=4, eval_interval=10**9, ckpt_interval=10**9, max_minutes=0.0
        )
        records: list[dict[str, Any]] = []
        train(
            timing, Path(tmp) / "run", on_event=lambda e: records.append(e) if "tokens_per_s" in e else None
        )
    rate = records[-1]["tokens_per_s"]  # steps 5..8: after the first, slow ones (and compilation)
    step_s = cfg.batch_size * cfg.block_size * cfg.grad_accum / rate
    # Each evaluation runs 2 x eval_iters forward passes, about a third of a step each.
    eval_steps = EVALS * 2 * cfg.eval_iters / 3
    return max(20, int(seconds / step_s - eval_steps))


def quickstart(
    out: str | os.PathLike[str] = "runs/quickstart",
    *,
    minutes: float = 5.0,
    max_steps: int | None = None,
    device: str = "auto",
    inputs: tuple[str, ...] = ("shakespeare",),
    tokenizer: str = TOKENIZER,
    overrides: dict[str, Any] | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> QuickstartResult:
    """Run the quick start into `out` (the run directory; the data goes to `out/data`).

    `inputs` and `tokenizer` are `prepare`'s; `overrides` change TrainConfig keys of the
    chosen model (tests use a small text, a small BPE and a tiny model).
    """
    from gpt2kit.evals.split_loss import split_loss
    from gpt2kit.model import GPT2

    stage = on_stage or (lambda msg: log.info("%s", msg))
    out = Path(out)
    if checkpoint_dirs(out) or (out / "final").exists():
        raise ConfigError(
            f"{out} already holds a training run; pass --out runs/another, remove {out}, or continue "
            f"it with gpt2kit train --resume {out}"
        )
    if minutes <= 0 and max_steps is None:
        raise ConfigError(f"--minutes must be > 0 (got {minutes}), or pass --max-steps")
    device = str(pick_device(device))  # a bad --device fails here, before any work

    data = _data(out / "data", inputs, tokenizer, stage)
    cfg, length = _plan(
        data.path, device=device, minutes=minutes, max_steps=max_steps, overrides=overrides, stage=stage
    )
    stage(
        f"3/4 training a GPT-2 (n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, block {cfg.block_size}) "
        f"for {length} into {out}"
    )
    t0 = time.perf_counter()
    result = train(cfg, out, on_event=on_event)
    seconds = time.perf_counter() - t0
    if result.final_dir is None:  # Ctrl-C: train() saved a checkpoint
        log.warning("interrupted at step %d; continue with: gpt2kit train --resume %s", result.step, out)
        raise KeyboardInterrupt

    stage("4/4 scoring the whole val split and sampling")
    model = GPT2.from_pretrained(result.final_dir, device=device)
    scores = split_loss(model, data, "val", block_size=cfg.block_size)
    return QuickstartResult(
        run_dir=out,
        data_dir=data.path,
        final_dir=result.final_dir,
        device=device,
        steps=result.step,
        train_seconds=seconds,
        val_loss=scores["loss"],
        bits_per_byte=scores["bits_per_byte"],
        val_tokens=scores["tokens"],
        samples=_samples(model, data.tokenizer()),
        config=cfg,
    )


def _data(data_dir: Path, inputs: tuple[str, ...], tokenizer: str, stage: Callable[[str], None]) -> TokenData:
    """Step 1: the prepared data, reused when `data_dir` already holds it."""
    from gpt2kit.data.prepare import prepare

    if _prepared(data_dir, inputs, tokenizer):
        stage(f"1/4 data: reusing {data_dir}")
    else:
        stage(f"1/4 data: {', '.join(inputs)} -> a new {tokenizer} byte-level BPE -> {data_dir}")
        shutil.rmtree(data_dir, ignore_errors=True)
        prepare(list(inputs), data_dir, tokenizer=tokenizer, val_fraction=VAL_FRACTION, progress=True)
    data = TokenData.open(data_dir)
    splits = data.meta["splits"]
    stage(
        f"    {splits['train']['tokens']:,} train tokens, {splits['val']['tokens']:,} val tokens, "
        f"vocabulary {data.n_vocab}"
    )
    return data


def _plan(
    data_dir: Path,
    *,
    device: str,
    minutes: float,
    max_steps: int | None,
    overrides: dict[str, Any] | None,
    stage: Callable[[str], None],
) -> tuple[TrainConfig, str]:
    """Step 2: the config to train and its length in words (timing a few steps for a time budget)."""
    if max_steps is None:
        cfg = quickstart_config(data_dir, device=device, max_steps=1000, minutes=minutes)
        cfg = cfg.replace(**(overrides or {}))
        stage(f"2/4 timing a few steps on {device} to fit {minutes:g} minutes of training")
        # The schedule follows the clock and ends the run when the minutes are up; max_steps
        # (a fifth above the estimate, in case the machine gets faster) only caps it.
        estimate = calibrate_steps(cfg, 60 * minutes)
        max_steps = int(1.2 * estimate)
        length = f"{minutes:g} minutes (about {estimate} steps)"
    else:
        minutes = 0.0  # --max-steps: exactly that many steps, whatever the time
        length = f"{max_steps} steps"
    cfg = quickstart_config(data_dir, device=device, max_steps=max_steps, minutes=minutes)
    return TrainConfig.from_dict(
        {**cfg.to_dict(), **(overrides or {})}, source="quickstart overrides"
    ), length


def _samples(model: GPT2, tokenizer: Tokenizer) -> dict[str, str]:
    """Step 4: a continuation of each of PROMPTS."""
    from gpt2kit.generation.complete import complete

    samples = {}
    for i, prompt in enumerate(PROMPTS):
        new = min(160, model.config.n_positions - len(tokenizer.encode_ordinary(prompt)))
        # The prompt and its continuation, which ends at the end-of-text id and leaves it out.
        done = complete(model, tokenizer, prompt, max_new_tokens=new, temperature=0.8, top_k=40, seed=i)[0]
        samples[prompt] = prompt + done.text
    return samples


def _prepared(data_dir: Path, inputs: tuple[str, ...], tokenizer: str) -> bool:
    """True when `data_dir` already holds this data (same inputs, tokenizer and split)."""
    try:
        meta = read_meta(data_dir)
    except Gpt2kitError:
        return False
    sources = [s.get("input") for s in meta.get("source", {}).get("inputs", [])]
    return (
        sources == list(inputs)
        and meta["tokenizer"].get("name") == tokenizer.replace(":", "-")
        and meta.get("val_fraction") == VAL_FRACTION
    )
