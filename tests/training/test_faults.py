"""Fault tests: real `gpt2kit prepare` and `gpt2kit train` processes killed with SIGKILL at
chosen moments, then rerun or resumed; nothing they saved may be lost or read half written.

Each test kills several times, at different moments. A moment is a named pause point
(gpt2kit.faults): the process stops there and says so in a file, and the test kills it then,
so every kill lands where the test means on any machine, fast or slow (a sleep would race
it). The test then checks that the moment left what it should on disk (a temporary file or
directory means the kill landed mid-write). Everything stays in tmp_path. docs/reliability.md
lists what these prove. (`gpt2kit serve` under faults and load: tests/server/test_serve_faults.py.)
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2kit.data.prepare import prepare
from gpt2kit.data.shards import TokenData
from gpt2kit.errors import DataError
from gpt2kit.training.checkpoint import checkpoint_dirs, latest_checkpoint, verify
from gpt2kit.training.loop import train
from gpt2kit.training.metrics import read_metrics
from pause_helpers import kill_paused, pause_env
from train_helpers import config, make_data, tiny_args


def gpt2kit(*args: str, marker: Path, at: str | None = None) -> subprocess.Popen:
    """`gpt2kit ARGS` in a child process that pauses at `at` ("NAME:N"), if given."""
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2kit", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=pause_env(marker, at, OMP_NUM_THREADS="1"),
    )


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

    out, marker = tmp_path / "killed", tmp_path / "paused"
    args = ["prepare", str(corpus), "--out", str(out), "--shard-tokens", str(SHARD_TOKENS), "--workers", "1"]
    # The run writes its shards' bytes in 41 pieces (SHARD_TOKENS and the documents decide
    # how many): kill it after the 1st (in the first shard, none finished), the 9th, the
    # 23rd and the 40th (the last train shard, with a full shard's bytes written, not renamed).
    for nth in (1, 9, 23, 40):
        proc = gpt2kit(*args, "--no-progress", marker=marker, at=f"prepare.mid_shard:{nth}")
        assert kill_paused(proc, marker) == f"prepare.mid_shard:{nth}"
        # The kill landed mid-shard: a shard's temporary file holds bytes, not yet renamed
        # (the val split's shard may be open beside the train split's).
        writing = [p for p in temp_files(out) if ".bin." in p.name]
        assert writing and all(p.stat().st_size > 0 for p in writing), writing
        # What a reader sees now: no meta.json, so no data at all, never a partial set of shards.
        with pytest.raises(DataError, match=r"no meta\.json"):
            TokenData.open(out)
        # Every shard under its real name is complete: byte-identical to the finished run's.
        shards = shard_files(out)
        assert nth == 1 or shards, "no finished shard to compare"
        for shard in shards:
            assert shard.read_bytes() == ref_shards[shard.name], f"{shard.name} is torn"

    rerun = gpt2kit(*args, "--no-progress", marker=marker)
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
    run, marker = tmp_path / "killed", tmp_path / "paused"

    # (where the process pauses, the checkpoint being written then, the newest complete one).
    # The N in NAME:N counts from the process's start, and a resumed run writes its first
    # checkpoint one step after the one it resumed from.
    rounds = [
        ("checkpoint.mid_write:2", 2, 1),  # the first run, mid-way through its 2nd checkpoint
        ("checkpoint.renamed:2", None, 3),  # resumed at 1: ckpt-3 in place, `latest` still says 2
        ("checkpoint.mid_write:3", 6, 5),  # resumed at 3: 4 and 5 written, mid-way through 6
        ("checkpoint.mid_write:1", 6, 5),  # resumed at 5: mid-way through its very first one
    ]
    for i, (at, writing, newest) in enumerate(rounds):
        args = tiny_args(data, run, **TRAIN) if i == 0 else ["train", "--resume", str(run), "--no-progress"]
        before = latest_checkpoint(run)
        assert kill_paused(gpt2kit(*args, marker=marker, at=at), marker) == at
        # Where the kill landed: inside a checkpoint's hidden temporary directory, or just
        # after its rename, before `latest` was moved on to it.
        assert [p.name for p in run.glob(".ckpt-*")] == ([f".ckpt-{writing:06d}.tmp"] if writing else [])
        if writing is None:
            assert (run / "latest").read_text().strip() == f"ckpt-{newest - 1:06d}"
        # Resume will pick the newest checkpoint whose every file matches its manifest.
        complete = complete_checkpoints(run)
        ckpt = latest_checkpoint(run)
        assert ckpt is not None and ckpt.step == max(complete) == newest
        assert before is None or ckpt.step >= before.step  # nothing saved was lost

    resume = gpt2kit("train", "--resume", str(run), "--no-progress", marker=marker)
    _, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err.decode()
    ref_bytes = (tmp_path / "ref" / "final" / "model.safetensors").read_bytes()
    assert (run / "final" / "model.safetensors").read_bytes() == ref_bytes
    ref_train, _ = read_metrics(tmp_path / "ref")
    got_train, _ = read_metrics(run)
    assert [r["step"] for r in got_train] == list(range(1, TRAIN["max_steps"] + 1))
    assert [r["loss"] for r in got_train] == [r["loss"] for r in ref_train]
    assert list(run.glob(".ckpt-*")) == []  # no half-written checkpoint left behind
