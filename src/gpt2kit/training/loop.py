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
(checkpoint.py). Since all state is saved and all randomness is derived from the step,
a resumed run is bit-identical to an uninterrupted one on CPU (unless a time budget drives
the schedule: its lr depends on the machine's speed).

`train` reads top to bottom: `setup_run` (run.py) builds the run, fresh or resumed; `_loop`
steps, logs, evaluates and checkpoints. Under torchrun, `parallel="ddp"` trains a
DistributedDataParallel replica per process and `parallel="fsdp"` shards weights, gradients
and optimizer state over the processes; the loop sees either through one `Parallel`
strategy (parallel.py). Both see the same micro-batches and average the same gradients, so
the loss curve is the same, and checkpoints have the same format either way.

>>> cfg = TrainConfig(data="data/shakespeare", max_steps=100)  # doctest: +SKIP
>>> result = train(cfg, "runs/shakespeare")  # doctest: +SKIP
>>> result.final_dir  # loads with gpt2kit generate --model and transformers  # doctest: +SKIP
PosixPath('runs/shakespeare/final')
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2kit.data.batches import BlockSampler
from gpt2kit.errors import CheckpointError, Gpt2kitError
from gpt2kit.faults import pause_point
from gpt2kit.model.checkpoint import save_model
from gpt2kit.model.config import GPT2Config
from gpt2kit.training.checkpoint import ckpt_name, save_checkpoint, write_dir
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.parallel import Parallel
from gpt2kit.training.run import Run, setup_run
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
    run = setup_run(cfg, run_dir, resume=resume, on_event=on_event)
    try:
        return _loop(run)
    finally:
        run.close()


# --- the loop --------------------------------------------------------------------------------


@dataclass
class _Clock:
    """The loop's measurements: time, throughput and the latest losses."""

    before_s: float  # seconds of the time budget used before this process started
    used_s: float = 0.0  # seconds of the budget used, the maximum over the ranks: the lr follows it
    start: float = field(default_factory=time.perf_counter)
    last_log: float = field(default_factory=time.perf_counter)
    steps_run: int = 0
    steps_since_log: int = 0
    trained_s: float = 0.0
    train_loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    interrupted: bool = False

    def elapsed(self) -> float:
        return self.before_s + time.perf_counter() - self.start


def _loop(run: Run) -> TrainResult:
    cfg = run.cfg
    clock = _Clock(before_s=run.elapsed_before, used_s=run.elapsed_before, trained_s=run.elapsed_before)
    run.emit(_start_record(run), to_file=False)
    with _Interrupt() as interrupt:
        run.model.train()
        while run.step < cfg.max_steps:
            lr_mult = lr_scale(run.step, cfg, elapsed_s=clock.used_s)
            loss, norm = _optimizer_step(run, lr_mult)
            clock.steps_run += 1
            clock.steps_since_log += 1
            if _due(run, cfg.log_interval):
                _log(run, clock, loss, norm, lr_mult)
            if _due(run, cfg.eval_interval):
                _evaluate(run, clock)
            if _stop(run, clock, interrupt):
                break
            if _due(run, cfg.ckpt_interval):
                _checkpoint(run, clock)
                clock.last_log = time.perf_counter()
        clock.trained_s = clock.elapsed()
        if run.step != run.saved_step:
            _checkpoint(run, clock)
    final_dir = None if clock.interrupted else _save_final(run)
    return TrainResult(
        run_dir=run.run_dir,
        step=run.step,
        interrupted=clock.interrupted,
        final_dir=final_dir,
        last_checkpoint=run.last_checkpoint,
        train_loss=clock.train_loss,
        val_loss=clock.val_loss,
        best_val_loss=run.best_val,
        tokens_per_s=clock.tokens_per_s,
        elapsed_s=clock.trained_s,
    )


def _due(run: Run, interval: int) -> bool:
    return run.step % interval == 0 or run.step == run.cfg.max_steps


def _optimizer_step(run: Run, lr_mult: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's micro-steps of one optimizer step, clipping and the update; (loss, grad norm)."""
    cfg, micros = run.cfg, run.micros
    run.optimizer.set_lr_scale(lr_mult)
    loss_sum = torch.zeros((), device=run.device)
    for j, m in enumerate(micros):
        x, y = run.train_sampler.batch(step=run.step, micro=m, batch_size=cfg.batch_size)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        # Gradients are averaged across ranks on the last micro-step only.
        with contextlib.nullcontext() if j == len(micros) - 1 else run.parallel.no_sync():
            with run.autocast():
                # Scaled so the gradient is the global batch's mean (DDP and FSDP average over ranks).
                loss = run.model(x, y).loss * (1.0 / len(micros))
            loss.backward()
        loss_sum += loss.detach()
    pause_point("train.mid_step")
    norm = run.parallel.clip_grad_norm(run.raw_model, cfg.grad_clip or math.inf)
    run.parallel.mean(loss_sum)
    if bool(torch.isfinite(norm) & torch.isfinite(loss_sum)):
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    else:
        run.optimizer.zero_grad(set_to_none=True)
        _non_finite(run, loss_sum.item())
    run.step += 1
    return loss_sum, norm


def _non_finite(run: Run, loss: float) -> None:
    """Stop with the way back (or, with skip_nonfinite, skip the step with a warning)."""
    cfg = run.cfg
    if cfg.skip_nonfinite:
        log.warning("step %d: non-finite loss %s, step skipped", run.step, loss)
        return
    where = (
        f"the last good checkpoint is {run.last_checkpoint}: resume with gpt2kit train --resume "
        f"{run.run_dir} --set lr={cfg.lr / 2:g} (or --set skip_nonfinite=true)"
        if run.last_checkpoint
        else "no checkpoint was written yet: lower lr and start again"
    )
    raise NonFiniteLossError(f"loss became {loss} at step {run.step}; {where}")


def _log(run: Run, clock: _Clock, loss: torch.Tensor, norm: torch.Tensor, lr_mult: float) -> None:
    cfg = run.cfg
    now = time.perf_counter()
    clock.tokens_per_s = rate = run.tokens_per_step * clock.steps_since_log / (now - clock.last_log)
    clock.train_loss = loss.item()
    eta = (now - clock.start) / clock.steps_run * (cfg.max_steps - run.step)
    budget_s = 60 * cfg.max_minutes
    record = {
        "step": run.step,
        "loss": clock.train_loss,
        "lr": cfg.lr * lr_mult,
        **({"muon_lr": cfg.muon_lr * lr_mult} if cfg.optimizer == "muon" else {}),
        "tokens_per_s": rate,
        "grad_norm": norm.item(),
        "time": time.time(),
        "eta_s": min(eta, max(budget_s - clock.elapsed(), 0.0)) if budget_s else eta,
    }
    peak = peak_flops(run.device)
    if peak:
        record["mfu"] = (
            flops_per_token(run.raw_model.config, cfg.block_size) * rate / (peak * run.parallel.world_size)
        )
    run.emit(record)
    clock.last_log, clock.steps_since_log = time.perf_counter(), 0


def _evaluate(run: Run, clock: _Clock) -> None:
    samplers = {"train": run.train_sampler, "val": run.val_sampler}
    losses = estimate_loss(run.eval_model, samplers, run.cfg, run.parallel, run.autocast)
    pause_point("train.mid_eval")
    train_eval, clock.val_loss = losses["train"], losses.get("val")
    score = clock.val_loss if clock.val_loss is not None else train_eval
    if run.best_val is None or score < run.best_val:
        run.best_val, run.best_step = score, run.step
    run.emit({"kind": "eval", "step": run.step, "train_loss": train_eval, "val_loss": clock.val_loss})
    clock.last_log = time.perf_counter()  # evaluation time is not training throughput


def _stop(run: Run, clock: _Clock, interrupt: _Interrupt) -> bool:
    """Ctrl-C, or the time budget spent: decided on every rank alike, so all stop at the same step."""
    flags = run.parallel.max_over_ranks([float(interrupt.requested), clock.elapsed()])
    clock.interrupted, clock.used_s = bool(flags[0]), flags[1]
    if clock.interrupted:
        return True
    cfg = run.cfg
    if cfg.max_minutes > 0 and clock.used_s >= 60 * cfg.max_minutes and run.step < cfg.max_steps:
        log.info("time budget of %g min reached at step %d of %d", cfg.max_minutes, run.step, cfg.max_steps)
        return True
    return False


def _checkpoint(run: Run, clock: _Clock) -> None:
    # Under FSDP every rank takes part in gathering the full state; rank 0 writes it.
    model = run.parallel.full_model(run.raw_model)
    optimizer = run.parallel.full_optimizer_state(run.raw_model, run.optimizer)
    if run.parallel.main:
        assert model is not None and optimizer is not None
        state = {
            "config": run.cfg.to_dict(),
            "data_position": {"seed": run.cfg.seed, "step": run.step},
            "best_val_loss": run.best_val,
            "best_step": run.best_step,
            "world_size": run.parallel.world_size,
            "elapsed_s": clock.elapsed(),
        }
        run.last_checkpoint = save_checkpoint(
            run.run_dir,
            step=run.step,
            model=model,
            tokenizer=run.tokenizer,
            optimizer=optimizer,
            state=state,
            keep_last=run.cfg.keep_last,
        )
        run.emit({"kind": "checkpoint", "step": run.step, "path": str(run.last_checkpoint)}, to_file=False)
    else:  # so that every rank's NaN message names the checkpoint rank 0 wrote
        run.last_checkpoint = run.run_dir / ckpt_name(run.step)
    run.saved_step = run.step
    pause_point("train.after_checkpoint")
    run.parallel.barrier()


def _save_final(run: Run) -> Path:
    final_dir = run.run_dir / "final"
    final = run.parallel.full_model(run.raw_model)  # under FSDP: every rank gathers
    if run.parallel.main:
        assert final is not None
        write_dir(final_dir, lambda tmp: save_model(final, tmp, tokenizer=run.tokenizer))
        run.emit({"kind": "final", "step": run.step, "path": str(final_dir)}, to_file=False)
    run.parallel.barrier()
    return final_dir


def _start_record(run: Run) -> dict[str, Any]:
    return {
        "kind": "start",
        "step": run.step,
        "max_steps": run.cfg.max_steps,
        "parameters": run.raw_model.num_parameters(),
        "device": str(run.device),
        "world_size": run.parallel.world_size,
        "tokens_per_step": run.tokens_per_step,
        "max_minutes": run.cfg.max_minutes,
    }


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


# --- pieces that are useful on their own ------------------------------------------------------


@torch.no_grad()
def estimate_loss(
    model: nn.Module,
    samplers: dict[str, BlockSampler | None],
    cfg: TrainConfig,
    parallel: Parallel,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """Mean loss over `eval_iters` fixed batches per split (the same batches at every eval).

    Each process scores the batches `parallel.eval_batches` gives it and the sums are added
    up; under FSDP a rank may score a batch again to keep in step, and doesn't count it.
    """
    model.eval()
    out = {}
    for split, sampler in samplers.items():
        if sampler is None:
            continue
        total = torch.zeros((), device=parallel.device, dtype=torch.float64)
        for k in parallel.eval_batches(cfg.eval_iters):
            micro = k % cfg.eval_iters
            x, y = sampler.batch(step=0, micro=micro, batch_size=cfg.batch_size, stream=f"eval-{split}")
            with autocast():
                loss = model(x.to(parallel.device), y.to(parallel.device)).loss.double()
            if k < cfg.eval_iters:
                total += loss
        parallel.sum(total)
        out[split] = total.item() / cfg.eval_iters
    model.train()
    return out


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
