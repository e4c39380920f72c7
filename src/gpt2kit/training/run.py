"""A run's setup: everything the training loop needs, fresh or resumed from a checkpoint.

`setup_run(cfg, run_dir)` returns a `Run`: the device (gpt2kit.device's choice) and the
parallel strategy (parallel.py), the data's samplers, the model (built, loaded to fine-tune,
or the checkpoint's weights), the optimizer, the autocast dtype, and where the run stands:
its step, best val loss, budget seconds used and last checkpoint. Resuming restores the
optimizer state and every RNG, so the loop continues exactly where the checkpoint left off.

>>> run = setup_run(TrainConfig(data="data/shakespeare"), "runs/shk", resume=True)  # doctest: +SKIP
>>> run.step, run.best_val  # doctest: +SKIP
(500, 4.21)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpt2kit import atomic
from gpt2kit.data.batches import BlockSampler, micro_steps
from gpt2kit.data.shards import TokenData
from gpt2kit.device import auto_dtype, pick_device, pick_dtype
from gpt2kit.errors import CheckpointError, ConfigError, DataError
from gpt2kit.model.checkpoint import from_hf_state_dict, read_state_dict, resolve
from gpt2kit.model.config import GPT2Config
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.tokenizer.tokenizer import Tokenizer
from gpt2kit.training.checkpoint import RunCheckpoint, checkpoint_dirs, latest_checkpoint, restore_rng
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.metrics import MetricsLog
from gpt2kit.training.optim import Optimizers, build_optimizer
from gpt2kit.training.parallel import Parallel, start_parallel, torchrun_env

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A run ready to train: what `setup_run` built, and where the run stands (the loop moves it)."""

    cfg: TrainConfig
    run_dir: Path
    parallel: Parallel
    raw_model: GPT2  # the plain module: clipping, checkpoints, the final model
    model: nn.Module  # what trains: compiled when asked, wrapped for DDP
    eval_model: nn.Module  # compiled when asked, never the DDP wrapper (evaluation syncs no gradients)
    optimizer: Optimizers
    tokenizer: Tokenizer
    train_sampler: BlockSampler
    val_sampler: BlockSampler | None  # None when the data has no val split
    amp: torch.dtype | None  # the autocast dtype; None: none
    metrics: MetricsLog | None  # on the main process only
    on_event: Callable[[dict[str, Any]], None]
    # where the run stands, as a checkpoint saves it
    step: int = 0
    best_val: float | None = None
    best_step: int | None = None
    elapsed_before: float = 0.0  # seconds of the time budget used before this process started
    last_checkpoint: Path | None = None
    saved_step: int = -1  # the step of the newest checkpoint

    @property
    def device(self) -> torch.device:
        return self.parallel.device

    @property
    def micros(self) -> range:
        """This process's micro-steps of each optimizer step."""
        return micro_steps(self.cfg.grad_accum, rank=self.parallel.rank, world_size=self.parallel.world_size)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum

    def autocast(self) -> AbstractContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def emit(self, record: dict[str, Any], *, to_file: bool = True) -> None:
        """Hand `record` to `on_event` (and metrics.jsonl unless `to_file=False`), on the main process."""
        if not self.parallel.main:
            return
        if to_file and self.metrics is not None:
            self.metrics.write(record)
        self.on_event(record)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.parallel.close()


def setup_run(
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> Run:
    """Set up the run in `run_dir` (with `resume=True` from its newest good checkpoint).

    Under torchrun this joins the process group; `Run.close()` leaves it. Writes
    RUN_DIR/config.toml and opens metrics.jsonl (main process).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _, local_rank, world = torchrun_env()
    check_config(cfg, world_size=world)
    device = pick_device(cfg.device, local_rank=local_rank if world > 1 else None, flag="--set device=")
    parallel = start_parallel(cfg.parallel, device)
    try:
        return _assemble(cfg, Path(run_dir), parallel, resume=resume, on_event=on_event or _ignore)
    except BaseException:
        parallel.close()
        raise


def check_config(cfg: TrainConfig, *, world_size: int) -> None:
    """What TrainConfig can't check alone: the data is set, and grad_accum splits over the processes."""
    if cfg.grad_accum % world_size:
        raise ConfigError(
            f"grad_accum ({cfg.grad_accum}) must be a multiple of the number of processes ({world_size}); "
            f"e.g. --set grad_accum={world_size * max(1, cfg.grad_accum // world_size)}"
        )
    if not cfg.data:
        raise ConfigError("data is not set; pass --data DATA_DIR (a directory made by gpt2kit prepare)")


def _assemble(
    cfg: TrainConfig,
    run_dir: Path,
    parallel: Parallel,
    *,
    resume: bool,
    on_event: Callable[[dict[str, Any]], None],
) -> Run:
    device = parallel.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 parts
    data = TokenData.open(cfg.data)
    tokenizer = data.tokenizer()
    ckpt = checkpoint_to_resume(cfg, run_dir) if resume else None
    if ckpt is None and checkpoint_dirs(run_dir):
        raise ConfigError(
            f"{run_dir} already holds checkpoints; continue it with gpt2kit train --resume {run_dir} "
            "or choose a new --out"
        )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw_model = build_model(cfg, data, resume_from=ckpt.path if ckpt else None).to(device)
    if cfg.block_size > raw_model.config.n_positions:
        raise ConfigError(f"block_size ({cfg.block_size}) exceeds the model's n_positions")
    amp = parallel.shard(raw_model, amp=autocast_dtype(cfg, device), optimizer=cfg.optimizer)
    # After sharding: the optimizer must hold the sharded (DTensor) parameters.
    optimizer = build_optimizer(raw_model, cfg, device)
    position = _restore(ckpt, cfg, parallel, raw_model, optimizer)
    train_sampler, val_sampler = _samplers(cfg, data, parallel)
    compiled = torch.compile(raw_model) if cfg.compile else raw_model
    if parallel.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "config.toml", cfg.to_toml())
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        parallel=parallel,
        raw_model=raw_model,
        model=parallel.wrap(compiled),
        # Under FSDP this is the sharded model: its forward all-gathers, so every rank runs it.
        eval_model=compiled,
        optimizer=optimizer,
        tokenizer=tokenizer,
        train_sampler=train_sampler,
        val_sampler=val_sampler,
        amp=amp,
        metrics=MetricsLog(run_dir, resume_step=ckpt.step if ckpt else None) if parallel.main else None,
        on_event=on_event,
        **position,
    )


def checkpoint_to_resume(cfg: TrainConfig, run_dir: Path) -> RunCheckpoint:
    """The newest good checkpoint of `run_dir`, or an error saying how to start over."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(
            f"{run_dir}: no usable checkpoint to resume from; start over with "
            f"gpt2kit train --data {cfg.data} --out {run_dir}"
        )
    return ckpt


def _restore(
    ckpt: RunCheckpoint | None, cfg: TrainConfig, parallel: Parallel, model: GPT2, optimizer: Optimizers
) -> dict[str, Any]:
    """Optimizer state and RNGs from `ckpt` (the weights came with the model); the `Run` fields
    that say where the run stands. Without a checkpoint: seeds each rank's RNGs."""
    if ckpt is None:
        # Dropout differs per rank; data order comes from batches.py, not from these.
        torch.manual_seed(cfg.seed + parallel.rank)
        random.seed(cfg.seed + parallel.rank)
        np.random.seed(cfg.seed + parallel.rank)
        return {}
    trained_with = ckpt.state.get("config", {}).get("optimizer", "adamw")
    if trained_with != cfg.optimizer:
        raise ConfigError(
            f"{ckpt.path} holds {trained_with} optimizer state, but optimizer is {cfg.optimizer!r}; "
            f"resume with --set optimizer={trained_with}, or start a new run from its weights "
            f"with --set init_from={ckpt.path}"
        )
    parallel.restore_optimizer(model, optimizer, ckpt)
    restore_rng(ckpt)
    log.info("resuming from %s (step %d)", ckpt.path, ckpt.step)
    return {
        "step": ckpt.step,
        "best_val": ckpt.state.get("best_val_loss"),
        "best_step": ckpt.state.get("best_step"),
        "elapsed_before": float(ckpt.state.get("elapsed_s", 0.0)),
        "last_checkpoint": ckpt.path,
        "saved_step": ckpt.step,
    }


def _samplers(
    cfg: TrainConfig, data: TokenData, parallel: Parallel
) -> tuple[BlockSampler, BlockSampler | None]:
    train = BlockSampler(data, "train", block_size=cfg.block_size, seed=cfg.seed)
    try:
        return train, BlockSampler(data, "val", block_size=cfg.block_size, seed=cfg.seed)
    except DataError as e:
        if parallel.main:
            log.warning("no validation loss: %s", e)
        return train, None


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain float32). Weights and optimizer state stay float32.

    `dtype = "auto"` is gpt2kit.device's choice for training (`auto_dtype(training=True)`).
    """
    if cfg.dtype == "auto":
        dtype, reason = auto_dtype(device, training=True)
        log.info("dtype auto: %s: %s", reason, "bf16 autocast" if dtype == torch.bfloat16 else "float32")
    else:
        dtype = pick_dtype(cfg.dtype, device, flag="--set dtype=")
    return None if dtype == torch.float32 else dtype


def model_config(cfg: TrainConfig, data: TokenData) -> GPT2Config:
    """The GPT-2 shape a from-scratch run builds: the config's size, the data's vocabulary."""
    sizes = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd}
    if cfg.init_from.startswith("scratch:"):
        preset = GPT2Config.from_name(cfg.init_from.removeprefix("scratch:"))
        sizes = {"n_layer": preset.n_layer, "n_head": preset.n_head, "n_embd": preset.n_embd}
    vocab = data.n_vocab
    return GPT2Config(
        vocab_size=vocab,
        n_positions=cfg.block_size,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=data.eot_token,
        eos_token_id=data.eot_token,
        # A multiple of 64 rows is faster; the extra rows are zero and never scored.
        padded_vocab_size=None if vocab % 64 == 0 else math.ceil(vocab / 64) * 64,
        **sizes,
    )


def build_model(cfg: TrainConfig, data: TokenData, *, resume_from: Path | None = None) -> GPT2:
    """A fresh model, a fine-tuning start (init_from a model dir / hub id) or a checkpoint's weights."""
    source: Path | None = resume_from
    if source is None and not cfg.init_from.startswith("scratch"):
        source = resolve(cfg.init_from)
    if source is None:
        model = GPT2(model_config(cfg, data))
    else:
        config = GPT2Config.from_json_file(source / "config.json").replace(
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout
        )
        if config.vocab_size != data.n_vocab:
            raise DataError(
                f"{source} has a vocabulary of {config.vocab_size} tokens but the data in {data.path} "
                f"uses {data.n_vocab}; prepare the data with that model's tokenizer "
                f"(gpt2kit prepare ... --tokenizer {source})"
            )
        if cfg.block_size > config.n_positions:
            raise ConfigError(
                f"block_size ({cfg.block_size}) exceeds the model's context of {config.n_positions}; "
                f"use --set block_size={config.n_positions}"
            )
        model = GPT2(config)
        # Copy into the freshly allocated (contiguous) parameters so numerics match a fresh run.
        model.load_state_dict(from_hf_state_dict(read_state_dict(source), model, source=source))
    with torch.no_grad():
        model.wte.weight[model.config.vocab_size :].zero_()  # padding rows: never used, kept zero
    return model


def _ignore(event: dict[str, Any]) -> None:
    pass
