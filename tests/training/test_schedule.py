"""The learning-rate schedule (gpt2kit/training/schedule.py): warmup, cosine and WSD, over steps or a time budget."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from gpt2kit.errors import ConfigError
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.loop import train
from gpt2kit.training.metrics import read_metrics
from gpt2kit.training.schedule import lr_at, lr_scale, progress
from train_helpers import config, make_data


def test_cosine_warms_up_then_decays_to_min_lr_at_max_steps() -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(111)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # decays monotonically
    assert lrs[60] == pytest.approx(0.55)  # half way: half way between lr and min_lr
    assert lrs[-1] == pytest.approx(0.1) and lrs[-2] > 0.1  # min_lr where the budget ends
    assert lr_at(500, cfg) == pytest.approx(0.1)  # past the end: min_lr


def test_wsd_is_constant_then_linear_to_zero_at_max_steps() -> None:
    cfg = TrainConfig(lr=2.0, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.25)
    lrs = [lr_at(s, cfg) for s in range(111)]
    assert lrs[:10] == pytest.approx([2.0 * (s + 1) / 10 for s in range(10)])
    assert lrs[10:85] == pytest.approx([2.0] * 75)  # stable: 75% of the 100 steps after warmup
    decay = lrs[85:]
    assert decay == pytest.approx([2.0 * (110 - s) / 25 for s in range(85, 111)])  # a straight line
    assert lrs[109] == pytest.approx(0.08) and lrs[110] == 0.0  # zero exactly at the end
    assert lr_at(200, cfg) == 0.0
    # "trapezoidal" is another name for the same schedule
    assert TrainConfig(schedule="trapezoidal").schedule == "wsd"
    with pytest.raises(ConfigError, match="schedule must be one of cosine, wsd"):
        TrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match=r"decay_fraction must be in \(0, 1\]"):
        TrainConfig(decay_fraction=0.0)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_time_budget_ends_the_schedule_when_the_time_ends(schedule: str) -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=5, max_steps=10**6, max_minutes=2.0, schedule=schedule)
    # progress follows the clock, not the (far) max_steps
    assert progress(100, cfg, elapsed_s=30.0) == pytest.approx(0.25)
    assert progress(100, cfg, elapsed_s=120.0) == 1.0
    assert lr_scale(100, cfg, elapsed_s=120.0) == 0.0  # zero when the budget is spent
    assert lr_scale(100, cfg, elapsed_s=500.0) == 0.0
    scales = [lr_scale(100, cfg, elapsed_s=t) for t in range(0, 121, 5)]
    assert all(a >= b for a, b in itertools.pairwise(scales)) and scales[0] == pytest.approx(1.0)
    # whichever ends first: here max_steps, long before the time budget
    short = cfg.replace(max_steps=105)
    assert lr_scale(105, short, elapsed_s=1.0) == 0.0
    # warmup is counted in steps whatever the clock says
    assert lr_scale(0, cfg, elapsed_s=119.0) == pytest.approx(0.2)


def test_a_run_stops_at_its_time_budget_with_the_lr_at_zero(tmp_path: Path) -> None:
    """A real run with a 4-second budget and far more steps than fit: the lr falls along the
    clock and is near zero by the last step, and the run ends by time, not by steps."""
    data = make_data(tmp_path / "d")
    budget_s = 4.0
    cfg = config(data, max_steps=10**6, max_minutes=budget_s / 60, schedule="wsd", decay_fraction=0.5)
    cfg = cfg.replace(log_interval=1, eval_interval=10**6, ckpt_interval=10**6, warmup_steps=2, lr=1e-2)
    result = train(cfg, tmp_path / "run")
    assert 10 < result.step < cfg.max_steps and result.final_dir is not None
    records, _ = read_metrics(tmp_path / "run")
    lrs = [r["lr"] for r in records]
    assert lrs[2] == pytest.approx(1e-2)  # stable phase at the peak
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))  # then only down
    # The last step started less than a step (plus a log line) before the end: its lr is the
    # line's value there. Steps of this tiny model take milliseconds; allow a slow machine 10%.
    assert lrs[-1] < 0.1 * 1e-2
    assert any(1e-3 < lr < 9e-3 for lr in lrs)  # the decay went through the middle, not a jump
