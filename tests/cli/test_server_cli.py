"""`gpt2kit serve` end to end as a subprocess, and `gpt2kit generate --interactive`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from cli_helpers import free_port
from server_helpers import make_model_dir

GPT2KIT = [sys.executable, "-m", "gpt2kit"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("cli"), n_positions=64)


def test_serve_subprocess(model_dir) -> None:
    port = free_port()
    env = {**os.environ, "GPT2KIT_API_KEY": "k"}
    proc = subprocess.Popen(
        [*GPT2KIT, "serve", "--model", str(model_dir), "--port", str(port), "--no-compile"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        # The model name defaults to the directory's name; the key comes from the environment.
        assert health["model"] == model_dir.name and health["auth_required"] is True
        body = {"model": model_dir.name, "prompt": "Hi", "max_tokens": 3, "seed": 0}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--max-n", "0", "--max-n must be >= 1"), ("--port", "70000", "--port must be in 1..65535")],
)
def test_serve_rejects_bad_flags(model_dir, flag, value, message) -> None:
    r = subprocess.run(
        [*GPT2KIT, "serve", "--model", str(model_dir), flag, value],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert f"gpt2kit serve: error: {message}" in r.stderr


def test_generate_interactive(model_dir, tmp_path) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
    cmd = [*GPT2KIT, "generate", "--model", str(model_dir), "--interactive", "--max-new-tokens", "4"]
    r = subprocess.run(
        [*cmd, "--temperature", "0"],
        input="Hello\n\nThe cat\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = [re.sub(r"^(>>> )+", "", line) for line in r.stdout.splitlines() if line.strip(" >")]
    assert lines[0].startswith("Hello") and len(lines[0]) > len("Hello")
    assert lines[1].startswith("The cat") and len(lines[1]) > len("The cat")
    assert r.stderr.count(" tokens in ") == 2  # one timing line per prompt; the empty line is skipped
    # The same prompt, non-interactively, gives the same greedy text.
    one = subprocess.run(
        [
            *GPT2KIT,
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.stdout.strip() == lines[0]
