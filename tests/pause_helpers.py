"""Stopping a real gpt2kit process at a named pause point (gpt2kit.faults), to kill it exactly there.

A kill test arms a point in the child's environment (`pause_env`), waits for the child to
say it is paused there (`wait_paused`: the pause file appears) and kills it (`kill_paused`).
No sleep picks the moment, so the kill lands where the test means on any machine, fast or slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def pause_env(marker: Path | None, at: str | None, **extra: str) -> dict[str, str]:
    """This environment plus `extra`, with the pause point `at` ("NAME:N") armed, or none."""
    env = {**os.environ, **extra}
    env.pop("GPT2KIT_PAUSE_AT", None)
    if at is not None:
        assert marker is not None, "a pause point needs the file that says the process is paused"
        env |= {"GPT2KIT_PAUSE_AT": at, "GPT2KIT_PAUSE_FILE": str(marker)}
    return env


def wait_paused(proc: subprocess.Popen, marker: Path, *, timeout: float = 300) -> str:
    """Until `proc` is paused at its armed point; returns where ("NAME:N"). Fails if it exits first.

    The deadline only turns a hang into a failure; the moment itself is the file appearing.
    """
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"exited with {proc.returncode} before its pause point: {err[-3000:]!r}")
        assert time.monotonic() < deadline, f"not paused after {timeout} s"
        time.sleep(0.005)
    where, pid = marker.read_text().split()
    assert int(pid) == proc.pid, f"{marker} was written by process {pid}, not {proc.pid}"
    return where


def kill_paused(proc: subprocess.Popen, marker: Path) -> str:
    """SIGKILL `proc` once it is paused; returns where it was. Removes the marker for the next run."""
    where = wait_paused(proc, marker)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    marker.unlink()
    return where
