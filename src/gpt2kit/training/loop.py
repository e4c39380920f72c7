"""The training loop: next-token prediction on prepared data, on one device or many (DDP or FSDP).

What one optimizer step does (docs/training.md says it for users):
1. lr from the schedule (schedule.py): linear warmup, then cosine to `min_lr` or constant and a
   linear decay to zero, ending at `max_steps` or when the `max_minutes` budget is spent;
2. `grad_accum` micro-batches of random blocks (batches.py), each a pure function of
   (seed, step, micro), loss scaled so the gradient is the global batch's mean; forward and
   backward under bf16 autocast where the device has native bf16 (`dtype = "auto"`);
3. gradient clipping at `grad_clip`; a non-finite gradient norm stops the run (or skips the step);
4. the optimizer step (optim.py): AdamW with weight decay on >= 2-D parameters only, or Muon
   for the blocks' matrices and AdamW for the rest.

Every `eval_interval` steps train/val loss is estimated on fixed batches, every
`ckpt_interval` steps (and at the end, and on Ctrl-C) a checkpoint is written
(runcheckpoint.py). Since all state is saved and all randomness is derived from the step,
a resumed run is bit-identical to an uninterrupted one on CPU (unless a time budget drives
the schedule: its lr depends on the machine's speed).

Under torchrun, `parallel="ddp"` trains a DistributedDataParallel replica per process and
`parallel="fsdp"` shards weights, gradients and optimizer state over the processes (fsdp.py);
both see the same micro-batches and average the same gradients, so the loss curve is the
same, and checkpoints have the same format either way.

>>> cfg = TrainConfig(data="data/shakespeare", max_steps=100)  # doctest: +SKIP
>>> result = train(cfg, "runs/shakespeare")  # doctest: +SKIP
>>> result.final_dir  # loads with gpt2kit generate --model and transformers  # doctest: +SKIP
PosixPath('runs/shakespeare/final')
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpt2kit import atomic
from gpt2kit.data.batches import BlockSampler, micro_steps
from gpt2kit.data.shards import TokenData
from gpt2kit.device import auto_dtype, pick_device
from gpt2kit.errors import CheckpointError, ConfigError, DataError, Gpt2kitError
from gpt2kit.model.checkpoint import from_hf_state_dict, read_state_dict, resolve, save_model
from gpt2kit.model.config import GPT2Config
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.training.checkpoint import (
    RunCheckpoint,
    checkpoint_dirs,
    ckpt_name,
    latest_checkpoint,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
    write_dir,
)
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.metrics import MetricsLog
from gpt2kit.training.optim import build_optimizer
from gpt2kit.training.schedule import lr_scale

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s for MFU, by substring of the CUDA device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


class NonFiniteLossError(Gpt2kitError):
    """The loss or gradient became NaN/inf."""


@dataclass
class TrainResult:
    """How a `train` call ended."""

    run_dir: Path
    step: int
    interrupted: bool
    final_dir: Path | None
    last_checkpoint: Path | None
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float | None
    elapsed_s: float  # the run's clock for max_minutes: training loop time, earlier sessions included


# --- pieces that are useful on their own ------------------------------------------------------


def flops_per_token(config: GPT2Config, block_size: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
    n = sum(
        [
            config.wte_rows * config.n_embd,
            config.n_layer * (12 * config.n_embd**2 + 13 * config.n_embd),
        ]
    )
    return 6 * n + 12 * config.n_layer * config.n_embd * block_size


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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


# --- distributed setup -----------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun set up (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_name.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank, local, world)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain float32). Weights and optimizer state stay float32.

    `dtype = "auto"` is gpt2kit.device's choice (bf16 where the GPU or CPU computes it
    natively) on CUDA and CPUs; on MPS it stays float32 (bf16 training there is unmeasured).
    """
    if cfg.dtype == "auto":
        if device.type not in ("cuda", "cpu"):
            return None
        dtype, reason = auto_dtype(device)
        log.info("dtype auto: %s: %s", reason, "bf16 autocast" if dtype == torch.bfloat16 else "float32")
        return None if dtype == torch.float32 else dtype
    return None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)


# --- the loop --------------------------------------------------------------------------------


class _Interrupt:
    """Turns the first Ctrl-C into a flag checked after each step (a second one aborts at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: saving a checkpoint after this step (Ctrl-C again to abort now)")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def resume_config(run_dir: str | os.PathLike[str], overrides: list[str] | None = None) -> TrainConfig:
    """The saved configuration of a run, with `key=value` overrides (e.g. a larger max_steps)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: no config.toml, so this is not a gpt2kit run directory; "
            "start a run with gpt2kit train --data DATA --out RUN_DIR"
        )
    return TrainConfig.load(path, overrides=overrides)


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train (or with `resume=True` continue) the run in `run_dir`; see the module docstring.

    `on_event` receives every record written to metrics.jsonl plus {"kind": "start" | "checkpoint"
    | "final"} records, on the main process only (the CLI draws its progress bar from them).
    """
    run_dir = Path(run_dir)
    d = init_distributed(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    try:
        return _train(cfg, run_dir, d, resume=resume, on_event=on_event or (lambda e: None))
    finally:
        if d.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, run_dir: Path, d: Dist, *, resume: bool, on_event: Callable[[dict[str, Any]], None]
) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.grad_accum % d.world_size:
        raise ConfigError(
            f"grad_accum ({cfg.grad_accum}) must be a multiple of the number of processes ({d.world_size}); "
            f"e.g. --set grad_accum={d.world_size * max(1, cfg.grad_accum // d.world_size)}"
        )
    if not cfg.data:
        raise ConfigError("data is not set; pass --data DATA_DIR (a directory made by gpt2kit prepare)")
    device = pick_device(cfg.device, local_rank=d.local_rank if d.enabled else None, flag="--set device=")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 parts
    data = TokenData.open(cfg.data)
    tokenizer = data.tokenizer()

    ckpt: RunCheckpoint | None = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(
                f"{run_dir}: no usable checkpoint to resume from; start over with "
                f"gpt2kit train --data {cfg.data} --out {run_dir}"
            )
    elif checkpoint_dirs(run_dir):
        raise ConfigError(
            f"{run_dir} already holds checkpoints; continue it with gpt2kit train --resume {run_dir} "
            "or choose a new --out"
        )

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, data, resume_from=ckpt.path if ckpt else None).to(device)
    if cfg.block_size > model.config.n_positions:
        raise ConfigError(f"block_size ({cfg.block_size}) exceeds the model's n_positions")
    raw_model = model
    amp = autocast_dtype(cfg, device)
    # With one process parallel="fsdp" has nothing to shard: the run is a plain one.
    sharded = cfg.parallel == "fsdp" and d.enabled
    if sharded:
        from gpt2kit.training import parallel as fsdp

        # FSDP computes in bf16 itself (MixedPrecisionPolicy); float16 stays autocast, as with DDP.
        fsdp.shard(raw_model, device, param_dtype=amp if amp == torch.bfloat16 else None)
        if d.main:
            log.info(
                "FSDP: weights, gradients and %s state sharded over %d processes%s",
                "Muon and AdamW" if cfg.optimizer == "muon" else "AdamW",
                d.world_size,
                " (bf16 compute, float32 reduction)" if amp == torch.bfloat16 else "",
            )
        amp = None if amp == torch.bfloat16 else amp
    # After sharding: the optimizer must hold the sharded (DTensor) parameters.
    optimizer = build_optimizer(raw_model, cfg, device)
    step = 0
    elapsed_before = 0.0  # seconds of this run's time budget used before this process started
    best_val: float | None = None
    best_step: int | None = None
    if ckpt is not None:
        trained_with = ckpt.state.get("config", {}).get("optimizer", "adamw")
        if trained_with != cfg.optimizer:
            raise ConfigError(
                f"{ckpt.path} holds {trained_with} optimizer state, but optimizer is {cfg.optimizer!r}; "
                f"resume with --set optimizer={trained_with}, or start a new run from its weights "
                f"with --set init_from={ckpt.path}"
            )
        # The weights came with build_model (every rank reads them; sharding kept each rank's slice).
        if sharded:
            fsdp.restore_optimizer(raw_model, optimizer, ckpt)
        else:
            restore_optimizer(optimizer, ckpt)
        restore_rng(ckpt)
        step = ckpt.step
        elapsed_before = float(ckpt.state.get("elapsed_s", 0.0))
        best_val, best_step = ckpt.state.get("best_val_loss"), ckpt.state.get("best_step")
        log.info("resuming from %s (step %d)", ckpt.path, step)
    else:
        # Dropout differs per rank; data order comes from batches.py, not from these.
        torch.manual_seed(cfg.seed + d.rank)
        random.seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)

    train_sampler = BlockSampler(data, "train", block_size=cfg.block_size, seed=cfg.seed)
    try:
        val_sampler: BlockSampler | None = BlockSampler(data, "val", block_size=cfg.block_size, seed=cfg.seed)
    except DataError as e:
        val_sampler = None
        if d.main:
            log.warning("no validation loss: %s", e)

    if cfg.compile:
        model = torch.compile(model)
    # Compiled when asked, never the DDP wrapper (evaluation needs no gradient sync). Under FSDP
    # it is the sharded model: its forward all-gathers the weights, so every rank must run it.
    eval_model = model
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    if sharded:
        no_sync = functools.partial(fsdp.no_sync, raw_model)
    elif d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        no_sync = model.no_sync
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=amp)) if amp else contextlib.nullcontext

    micros = list(micro_steps(cfg.grad_accum, rank=d.rank, world_size=d.world_size))
    loss_scale = 1.0 / len(micros)  # DDP and FSDP average over ranks, so the gradient is the global mean
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    flops = flops_per_token(raw_model.config, cfg.block_size)
    peak = peak_flops(device)

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "config.toml", cfg.to_toml())
    metrics = MetricsLog(run_dir, resume_step=step if ckpt else None) if d.main else None

    def emit(record: dict[str, Any], *, to_file: bool = True) -> None:
        if not d.main:
            return
        if to_file and metrics is not None:
            metrics.write(record)
        on_event(record)

    last_ckpt: Path | None = ckpt.path if ckpt else None
    saved_step = step if ckpt else -1
    train_loss = val_loss = rate = None
    interrupted = False
    t_start = time.perf_counter()
    budget_s = 60 * cfg.max_minutes
    trained_s = elapsed_before

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def checkpoint() -> None:
        nonlocal last_ckpt, saved_step
        # Under FSDP every rank takes part in gathering the full state; rank 0 writes it.
        plain, opt_state = (
            (fsdp.full_model(raw_model), fsdp.full_optimizer_state(raw_model, optimizer))
            if sharded
            else (raw_model, optimizer)
        )
        if d.main:
            assert plain is not None and opt_state is not None
            state = {
                "config": cfg.to_dict(),
                "data_position": {"seed": cfg.seed, "step": step},
                "best_val_loss": best_val,
                "best_step": best_step,
                "world_size": d.world_size,
                "elapsed_s": elapsed(),
            }
            last_ckpt = save_checkpoint(
                run_dir,
                step=step,
                model=plain,
                tokenizer=tokenizer,
                optimizer=opt_state,
                state=state,
                keep_last=cfg.keep_last,
            )
            emit({"kind": "checkpoint", "step": step, "path": str(last_ckpt)}, to_file=False)
        else:  # so that every rank's NaN message names the checkpoint rank 0 wrote
            last_ckpt = run_dir / ckpt_name(step)
        saved_step = step
        _barrier(d)

    emit(
        {
            "kind": "start",
            "step": step,
            "max_steps": cfg.max_steps,
            "parameters": raw_model.num_parameters(),
            "device": str(device),
            "world_size": d.world_size,
            "tokens_per_step": tokens_per_step,
            "max_minutes": cfg.max_minutes,
        },
        to_file=False,
    )
    try:
        with _Interrupt() as interrupt:
            t_log, steps_since_log, steps_run = time.perf_counter(), 0, 0
            # Seconds of the budget used, the same on every rank (rank clocks differ): the lr follows it.
            used = elapsed_before
            model.train()
            while step < cfg.max_steps:
                lr_mult = lr_scale(step, cfg, elapsed_s=used)
                optimizer.set_lr_scale(lr_mult)
                loss_sum = torch.zeros((), device=device)
                for j, m in enumerate(micros):
                    x, y = train_sampler.batch(step=step, micro=m, batch_size=cfg.batch_size)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    sync = j == len(micros) - 1 or not d.enabled
                    # Gradients are averaged across ranks on the last micro-step only.
                    with contextlib.nullcontext() if sync else no_sync():
                        with autocast():
                            loss = model(x, y).loss * loss_scale
                        loss.backward()
                    loss_sum += loss.detach()
                norm = nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
                if sharded:
                    norm = norm.full_tensor()  # a replicated DTensor: the norm over all shards
                if d.enabled:
                    _all_reduce_mean(loss_sum, d)
                finite = bool(torch.isfinite(norm) & torch.isfinite(loss_sum))
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    if not cfg.skip_nonfinite:
                        where = (
                            f"the last good checkpoint is {last_ckpt}: resume with gpt2kit train --resume "
                            f"{run_dir} --set lr={cfg.lr / 2:g} (or --set skip_nonfinite=true)"
                            if last_ckpt
                            else "no checkpoint was written yet: lower lr and start again"
                        )
                        raise NonFiniteLossError(f"loss became {loss_sum.item()} at step {step}; {where}")
                    log.warning("step %d: non-finite loss %s, step skipped", step, loss_sum.item())
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                steps_run += 1
                steps_since_log += 1

                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    rate = tokens_per_step * steps_since_log / (now - t_log)
                    train_loss = loss_sum.item()
                    eta = (now - t_start) / steps_run * (cfg.max_steps - step)
                    record = {
                        "step": step,
                        "loss": train_loss,
                        "lr": cfg.lr * lr_mult,
                        **({"muon_lr": cfg.muon_lr * lr_mult} if cfg.optimizer == "muon" else {}),
                        "tokens_per_s": rate,
                        "grad_norm": norm.item(),
                        "time": time.time(),
                        "eta_s": min(eta, max(budget_s - elapsed(), 0.0)) if budget_s else eta,
                    }
                    if peak:
                        record["mfu"] = flops * rate / (peak * d.world_size)
                    emit(record)
                    t_log, steps_since_log = time.perf_counter(), 0

                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    losses = estimate_loss(
                        eval_model,
                        {"train": train_sampler, "val": val_sampler},
                        cfg,
                        device,
                        d,
                        autocast,
                        lockstep=sharded,
                    )
                    train_eval, val_loss = losses["train"], losses.get("val")
                    score = val_loss if val_loss is not None else train_eval
                    if best_val is None or score < best_val:
                        best_val, best_step = score, step
                    emit({"kind": "eval", "step": step, "train_loss": train_eval, "val_loss": val_loss})
                    t_log = time.perf_counter()  # evaluation time is not training throughput

                flags = _max_over_ranks([float(interrupt.requested), elapsed()], d, device)
                interrupted, used = bool(flags[0]), flags[1]
                time_up = budget_s > 0 and used >= budget_s
                if interrupted:
                    break
                if time_up and step < cfg.max_steps:
                    log.info(
                        "time budget of %g min reached at step %d of %d", cfg.max_minutes, step, cfg.max_steps
                    )
                    break
                if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
                    checkpoint()
                    t_log = time.perf_counter()
            trained_s = elapsed()
            if step != saved_step:
                checkpoint()
        final_dir = None
        if not interrupted:
            final_dir = run_dir / "final"
            final = fsdp.full_model(raw_model) if sharded else raw_model  # under FSDP: every rank gathers
            if d.main:
                assert final is not None
                write_dir(final_dir, lambda tmp: save_model(final, tmp, tokenizer=tokenizer))
                emit({"kind": "final", "step": step, "path": str(final_dir)}, to_file=False)
            _barrier(d)
    finally:
        if metrics is not None:
            metrics.close()
    return TrainResult(
        run_dir=run_dir,
        step=step,
        interrupted=interrupted,
        final_dir=final_dir,
        last_checkpoint=last_ckpt,
        train_loss=train_loss,
        val_loss=val_loss,
        best_val_loss=best_val,
        tokens_per_s=rate,
        elapsed_s=trained_s,
    )


@torch.no_grad()
def estimate_loss(
    model: nn.Module,
    samplers: dict[str, BlockSampler | None],
    cfg: TrainConfig,
    device: torch.device,
    d: Dist,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    *,
    lockstep: bool = False,
) -> dict[str, float]:
    """Mean loss over `eval_iters` fixed batches per split (the same batches at every eval).

    Rank r scores batches r, r + N, ... With `lockstep` (FSDP, whose every forward is a
    collective all-gather) all ranks run the same number of forwards: when N doesn't divide
    `eval_iters`, the ranks short of one score a batch again and don't count it.
    """
    model.eval()
    out = {}
    n = -(-cfg.eval_iters // d.world_size) * d.world_size if lockstep else cfg.eval_iters
    for split, sampler in samplers.items():
        if sampler is None:
            continue
        total = torch.zeros((), device=device, dtype=torch.float64)
        for k in range(d.rank, n, d.world_size):
            micro = k % cfg.eval_iters
            x, y = sampler.batch(step=0, micro=micro, batch_size=cfg.batch_size, stream=f"eval-{split}")
            with autocast():
                loss = model(x.to(device), y.to(device)).loss.double()
            if k < cfg.eval_iters:
                total += loss
        if d.enabled:
            import torch.distributed as dist

            dist.all_reduce(total)
        out[split] = total.item() / cfg.eval_iters
    model.train()
    return out


def _all_reduce_mean(t: torch.Tensor, d: Dist) -> None:
    import torch.distributed as dist

    dist.all_reduce(t)
    t /= d.world_size


def _max_over_ranks(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Each value's maximum over the ranks, so all ranks stop at the same step with the same lr."""
    if not d.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()
