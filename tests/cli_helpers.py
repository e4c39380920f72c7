"""Running the `gpt2kit` command as a user does (a fresh process) or in-process, and checking its errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from gpt2kit.cli import main


def gpt2kit(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real command in a fresh process, as a user would."""
    # One thread: a tiny model gains nothing from more, and a loaded machine makes them contend.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gpt2kit", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The same dispatcher in-process (cheaper, for the many error cases)."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err


def assert_clean_error(code: int, err: str, command: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith(f"gpt2kit {command}: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
