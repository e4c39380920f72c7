"""gpt2kit.faults: how GPT2KIT_PAUSE_AT is read, and a real process pausing and going on.

The kill tests that use the points are tests/training/test_faults.py,
tests/training/test_train.py and tests/server/test_serve_faults.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpt2kit import faults
from pause_helpers import pause_env, wait_paused


def test_the_spec_names_points_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT2KIT_PAUSE_FILE", "/tmp/unused")
    assert faults._armed("") == {}
    assert faults._armed("train.mid_step:2, prepare.mid_shard") == {
        "train.mid_step": 2,
        "prepare.mid_shard": 1,
    }


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("train.mid_stpe:2", r"no pause point 'train.mid_stpe'; the points are \[.*'train.mid_step'"),
        ("train.mid_step:0", r"needs a count >= 1 after the colon, e.g. train.mid_step:2"),
        ("train.mid_step:x", r"needs a count >= 1"),
    ],
)
def test_a_wrong_spec_is_an_error_not_a_point_that_never_pauses(
    monkeypatch: pytest.MonkeyPatch, spec: str, problem: str
) -> None:
    monkeypatch.setenv("GPT2KIT_PAUSE_FILE", "/tmp/unused")
    with pytest.raises(faults.PausePointError, match=problem):
        faults._armed(spec)


def test_a_spec_without_a_pause_file_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPT2KIT_PAUSE_FILE", raising=False)
    with pytest.raises(faults.PausePointError, match="GPT2KIT_PAUSE_FILE is not"):
        faults._armed("train.mid_step")


def test_unarmed_points_do_nothing() -> None:
    assert faults._ARMED == {}  # the test process has no GPT2KIT_PAUSE_AT
    faults.pause_point("train.mid_step")  # returns at once


def test_a_process_pauses_the_nth_time_and_goes_on_when_the_file_is_removed(tmp_path: Path) -> None:
    marker = tmp_path / "paused"
    code = (
        "from gpt2kit.faults import pause_point\n"
        "for i in range(1, 4):\n"
        "    print('before', i, flush=True)\n"
        "    pause_point('train.mid_step')\n"
        "print('done', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=pause_env(marker, "train.mid_step:2"),
    )
    assert wait_paused(proc, marker) == "train.mid_step:2"
    assert proc.stdout is not None
    assert [proc.stdout.readline() for _ in range(2)] == ["before 1\n", "before 2\n"]
    assert proc.poll() is None  # still there, paused
    marker.unlink()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == "before 3\ndone\n"  # it went on, and did not pause the 3rd time
    assert not marker.exists()
