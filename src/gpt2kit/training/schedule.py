"""The learning-rate schedule: linear warmup, then cosine or warmup-stable-decay (WSD), over a budget.

The budget is `max_steps`, or with `max_minutes > 0` also a time budget, whichever ends first:
after warmup, the schedule's progress is the larger of the fraction of steps done and the
fraction of the time used, so the decay ends when the budget does, however fast the machine.

- `cosine` (nanoGPT's): from the peak down a half cosine to `min_lr` at the end.
- `wsd` (also called trapezoidal; modded-nanogpt's): constant at the peak, then a straight
  line to zero over the last `decay_fraction` of the budget.

Every parameter group follows the same curve from its own peak (`lr` for AdamW, `muon_lr`
for Muon): `lr_scale` is the multiplier. A step-only schedule is a pure function of the step,
which keeps resumed runs bit-identical; a time budget depends on the machine's speed.

>>> cfg = TrainConfig(warmup_steps=0, max_steps=100, schedule="wsd", decay_fraction=0.5)
>>> lr_scale(0, cfg), lr_scale(50, cfg), lr_scale(75, cfg), lr_scale(100, cfg)
(1.0, 1.0, 0.5, 0.0)
>>> lr_scale(0, cfg.replace(max_minutes=10.0), elapsed_s=450.0)  # 3/4 of the time: 3/4 through
0.5
"""

from __future__ import annotations

import math

from gpt2kit.training.config import TrainConfig


def progress(step: int, cfg: TrainConfig, *, elapsed_s: float = 0.0) -> float:
    """How far past warmup the run is, from 0 (warmup done) to 1 (budget spent), clamped to [0, 1].

    `elapsed_s` counts only with a time budget (`max_minutes > 0`).
    """
    by_steps = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    by_time = elapsed_s / (60 * cfg.max_minutes) if cfg.max_minutes > 0 else 0.0
    return min(max(by_steps, by_time, 0.0), 1.0)


def lr_scale(step: int, cfg: TrainConfig, *, elapsed_s: float = 0.0) -> float:
    """The multiplier of every group's peak lr at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    p = progress(step, cfg, elapsed_s=elapsed_s)
    if cfg.schedule == "wsd":
        return min(1.0, (1.0 - p) / cfg.decay_fraction)
    floor = cfg.decay_to / cfg.lr
    return floor + 0.5 * (1.0 + math.cos(math.pi * p)) * (1.0 - floor)


def lr_at(step: int, cfg: TrainConfig, *, elapsed_s: float = 0.0) -> float:
    """AdamW's learning rate (`lr` times `lr_scale`) at optimizer step `step`.

    >>> cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=100)
    >>> lr_at(0, cfg), lr_at(9, cfg), round(lr_at(100, cfg), 6)
    (0.0001, 0.001, 0.0001)
    """
    return cfg.lr * lr_scale(step, cfg, elapsed_s=elapsed_s)
