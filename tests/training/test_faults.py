"""Fault tests: real `gpt2kit prepare` and `gpt2kit train` processes killed with SIGKILL at
random moments, then rerun or resumed; nothing they saved may be lost or read half written.

Each test kills several times, at different moments, and records where each kill landed
(a temporary file or directory left behind means it landed mid-write). The counts and
times are bounded; everything stays in tmp_path. docs/reliability.md lists what these
prove. (`gpt2kit serve` under faults and load: tests/server/test_serve_faults.py.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gpt2kit.data.prepare import prepare
from gpt2kit.data.shards import TokenData
from gpt2kit.errors import DataError
from gpt2kit.training.checkpoint import checkpoint_dirs, latest_checkpoint, verify
from gpt2kit.training.loop import train
from gpt2kit.training.metrics import read_metrics
from train_helpers import config, make_data, tiny_args

KILLS = 4  # kills per test, each at another moment
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def gpt2kit(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2kit", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV
    )


def kill_when(
    proc: subprocess.Popen, ready: Callable[[], bool], *, jitter: float, timeout: float = 120
) -> bool:
    """SIGKILL `proc` a random 0..`jitter` seconds after `ready()` first holds; False if it exited first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the process never reached the moment to kill it"
        time.sleep(0.001)
    time.sleep(random.uniform(0.0, jitter))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


# --- gpt2kit prepare, killed mid-shard -------------------------------------------------------------

SHARD_TOKENS = 20_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~4 MB of JSON Lines in many documents, so tokenizing takes several batches and shards."""
    rng = random.Random(15)
    words = [
        "the",
        "king",
        "queen",
        "ghost",
        "sword",
        "crown",
        "night",
        "day",
        "love",
        "death",
        "river",
        "mill",
        "grain",
        "rope",
    ]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(12_000):
            text = f"Document {i}. " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 90)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def shard_files(out: Path) -> list[Path]:
    return sorted(p for split in ("train", "val") for p in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].bin"))


def temp_files(out: Path) -> list[Path]:
    return sorted(out.glob(".*.tmp"))


def test_prepare_killed_mid_shard_never_leaves_a_torn_shard(corpus: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    prepare([str(corpus)], reference, shard_tokens=SHARD_TOKENS, workers=1, progress=False)
    ref_shards = {p.name: p.read_bytes() for p in shard_files(reference)}
    assert len(ref_shards) > 10

    out = tmp_path / "killed"
    args = ["prepare", str(corpus), "--out", str(out), "--shard-tokens", str(SHARD_TOKENS), "--workers", "1"]
    mid_shard = 0
    for _ in range(KILLS):
        proc = gpt2kit(*args, "--no-progress")
        # Some moment after the first shard is being written: a shard's temporary file exists.
        if not kill_when(proc, lambda: bool(temp_files(out)), jitter=0.5):
            continue
        mid_shard += bool([p for p in temp_files(out) if ".bin." in p.name])
        # What a reader sees now: no meta.json, so no data at all, never a partial set of shards.
        with pytest.raises(DataError, match=r"no meta\.json"):
            TokenData.open(out)
        # Every shard under its real name is complete: byte-identical to the finished run's.
        for shard in shard_files(out):
            assert shard.read_bytes() == ref_shards[shard.name], f"{shard.name} is torn"
    assert mid_shard >= 1, "no kill landed while a shard was being written"

    rerun = gpt2kit(*args, "--no-progress")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert (out / "meta.json").read_bytes() != b""
    assert {p.name: p.read_bytes() for p in shard_files(out)} == ref_shards
    assert temp_files(out) == []  # the rerun removed what the killed runs left half written
    data, ref = TokenData.open(out), TokenData.open(reference)
    for split in ("train", "val"):
        assert np.array_equal(data.tokens(split), ref.tokens(split))


# --- gpt2kit train, killed mid-checkpoint-write -----------------------------------------------------

TRAIN = {
    "max_steps": 16,
    "ckpt_interval": 1,
    "eval_interval": 8,
    "log_interval": 1,
    "dropout": 0.1,
    "keep_last": 3,
}


def complete_checkpoints(run: Path) -> list[int]:
    return [int(p.name.removeprefix("ckpt-")) for p in checkpoint_dirs(run) if verify(p) is None]


def test_train_killed_mid_checkpoint_resumes_bit_identical(tmp_path: Path) -> None:
    """Checkpoint every step, kill -9 while one is being written, resume with `gpt2kit train --resume`."""
    data = make_data(tmp_path / "data")
    train(config(data, **TRAIN), tmp_path / "ref")  # uninterrupted, in this process
    run = tmp_path / "killed"

    def writing_checkpoint() -> bool:
        return any(p.name.startswith(".ckpt-") for p in run.glob(".ckpt-*.tmp"))

    def writing_another_checkpoint() -> bool:  # there is one to resume from
        return writing_checkpoint() and bool(complete_checkpoints(run))

    mid_write, resumed_from = 0, []
    for round in range(KILLS):
        args = (
            tiny_args(data, run, **TRAIN) if round == 0 else ["train", "--resume", str(run), "--no-progress"]
        )
        before = latest_checkpoint(run)
        proc = gpt2kit(*args)
        # Even rounds kill as soon as a write is seen (a tiny model's checkpoint is written in
        # milliseconds, so a random delay alone may miss every write), odd rounds a moment later.
        if not kill_when(proc, writing_another_checkpoint, jitter=0.0 if round % 2 == 0 else 0.05):
            break  # the run finished; the final resume below is then a no-op check
        mid_write += writing_checkpoint()
        # Resume will pick the newest checkpoint whose every file matches its manifest.
        complete = complete_checkpoints(run)
        ckpt = latest_checkpoint(run)
        assert ckpt is not None and ckpt.step == max(complete)
        assert before is None or ckpt.step >= before.step  # nothing saved was lost
        resumed_from.append(ckpt.step)
    assert mid_write >= 1, "no kill landed while a checkpoint was being written"

    resume = gpt2kit("train", "--resume", str(run), "--no-progress")
    _, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err.decode()
    ref_bytes = (tmp_path / "ref" / "final" / "model.safetensors").read_bytes()
    assert (run / "final" / "model.safetensors").read_bytes() == ref_bytes
    ref_train, _ = read_metrics(tmp_path / "ref")
    got_train, _ = read_metrics(run)
    assert [r["step"] for r in got_train] == list(range(1, TRAIN["max_steps"] + 1))
    assert [r["loss"] for r in got_train] == [r["loss"] for r in ref_train]
    assert list(run.glob(".ckpt-*")) == []  # no half-written checkpoint left behind
