"""A failing engine thread is visible and fast: requests in flight get a 500, /health and
every later model request a 503 naming the failure, and `gpt2kit serve
--exit-on-engine-failure` exits with status 1.

The fault is real: the server decodes with `FaultyStep`, the eager decode step that raises
when it decodes two rows at once, on the engine thread, as a broken kernel would. The
servers are real: the app on loopback, and `gpt2kit serve` as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import FinishEvent
from gpt2kit.model import GPT2
from gpt2kit.server.worker import Failed, Worker, WorkerUnavailable
from server_helpers import MODEL_NAME, FaultyStep, check_error, make_model_dir, running_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("engine-failure"), n_positions=512)


def wait_until(ready, *, limit_s: float = 60) -> None:
    """Poll `ready()` until it holds (bounded; a bound, not a timed assertion)."""
    deadline = time.monotonic() + limit_s
    while not ready():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.005)


def body(max_tokens: int, **changes) -> dict:
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": max_tokens, "seed": 1, **changes}


def test_a_failed_engine_answers_500_in_flight_then_503(model_dir: Path) -> None:
    with (
        running_server(model_dir, make_step=FaultyStep) as s,
        httpx.Client(base_url=s.url, timeout=60) as client,
    ):
        assert client.get("/health").status_code == 200
        short = client.post("/v1/completions", json=body(4))  # one row: decodes normally
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4

        # A stream and a plain request both in flight when the step fails: the engine
        # thread is held (by a job) while the second joins, so the next step decodes both.
        with client.stream("POST", "/v1/completions", json=body(400, stream=True)) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert "choices" in json.loads(first[6:])
            release = threading.Event()
            held = s.worker.call(release.wait)
            with ThreadPoolExecutor(1) as pool:
                plain = pool.submit(client.post, "/v1/completions", json=body(100))
                wait_until(lambda: held.running() and s.worker.load == 2)
                release.set()
                check_error(plain.result(timeout=60), 500, None)
            assert "injected fault" in plain.result().json()["error"]["message"]
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])["error"]
        assert error["type"] == "server_error" and "injected fault" in error["message"]

        health = client.get("/health")
        check_error(health, 503, None)
        assert health.json()["error"]["code"] == "engine_failed"
        assert "RuntimeError: injected fault" in health.json()["error"]["message"]
        # Anything that needs the model is refused at once, naming the failure.
        for path, payload in [
            ("/v1/completions", body(4)),
            ("/v1/completions", body(4, stream=True)),
            ("/api/next", {"text": "Hello"}),
            ("/api/surprise", {"text": "Hello"}),
        ]:
            r = client.post(path, json=payload)
            check_error(r, 503, None)
            assert "injected fault" in r.json()["error"]["message"], path
        # What needs no model still works.
        assert client.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"] == [15496]
        assert s.worker.load == 0


def test_a_request_the_engine_refuses_fails_alone(model_dir: Path) -> None:
    """`Engine.add` raising (a prompt past the vocabulary that slipped through) fails that
    request only; the engine thread lives on."""
    model = GPT2.from_pretrained(model_dir)
    worker = Worker(model, eos_token_id=50256, slots=2)

    async def scenario() -> None:
        sink: asyncio.Queue = asyncio.Queue()
        worker.submit([[15496, 10**6]], SamplingConfig(max_new_tokens=4), sink=sink)
        event = await asyncio.wait_for(sink.get(), timeout=60)
        assert isinstance(event, Failed) and event.row is None
        assert "ConfigError" in event.message and "vocabulary" in event.message
        assert worker.failure is None and worker.load == 0
        ok: asyncio.Queue = asyncio.Queue()
        worker.submit([[15496]], SamplingConfig(max_new_tokens=3, seed=0), sink=ok)
        while not isinstance(event := await asyncio.wait_for(ok.get(), timeout=60), FinishEvent):
            pass
        assert event.reason == "length" and len(event.row.tokens) == 3

    try:
        asyncio.run(scenario())
    finally:
        worker.stop()


def test_jobs_waiting_when_the_engine_fails_get_the_failure(model_dir: Path) -> None:
    model = GPT2.from_pretrained(model_dir)
    failed: list[str] = []
    told = threading.Event()

    def on_failure(reason: str) -> None:
        failed.append(reason)
        told.set()

    worker = Worker(model, eos_token_id=50256, slots=2, step=FaultyStep(model), on_failure=on_failure)
    release = threading.Event()
    try:
        held = worker.call(release.wait)  # the engine thread waits here
        waiting = worker.call(lambda: "never run")

        async def submit() -> asyncio.Queue:
            sink: asyncio.Queue = asyncio.Queue()
            worker.submit([[15496]], SamplingConfig(max_new_tokens=100, n=2), sink=sink)  # 2 rows: the fault
            release.set()
            while not isinstance(event := await asyncio.wait_for(sink.get(), timeout=60), Failed):
                pass
            return event

        event = asyncio.run(submit())
        assert held.result(timeout=60) is True
        # The job queued behind the fault may have run before it (jobs and steps alternate)
        # or been failed by it; either way it was answered.
        with contextlib.suppress(WorkerUnavailable):
            assert waiting.result(timeout=60) == "never run"
        assert "injected fault" in event.message
        assert told.wait(timeout=60)
        assert failed == [worker.failure] and "injected fault" in failed[0]
        with pytest.raises(WorkerUnavailable, match="injected fault"):
            worker.call(lambda: None)
    finally:
        worker.stop()


DRIVER = """
import sys
from gpt2kit import cli
from gpt2kit.server import stepbuild
from server_helpers import FaultyStep

def plan(model, **_):  # serve's step: the faulty one, nothing built in the background
    step = FaultyStep(model)
    return stepbuild.Plan(step, False, stepbuild.StepStatus.of(step))

stepbuild.plan = plan
cli.main(sys.argv[1:])
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_exits_non_zero_with_exit_on_engine_failure(model_dir: Path) -> None:
    """`gpt2kit serve` (its CLI entry point, with the faulty step in place of the compiled
    one): the request in flight gets its 500, then the process exits with status 1."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    cmd = [sys.executable, "-c", DRIVER, "serve", "--model", str(model_dir)]
    cmd += ["--model-name", MODEL_NAME, "--port", str(port), "--threads", "1", "--exit-on-engine-failure"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "gpt2kit serve did not start"
            time.sleep(0.1)
        assert httpx.post(f"{url}/v1/completions", json=body(4), timeout=60).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json=body(100, n=2), timeout=60)  # 2 rows: the fault
        check_error(r, 500, None)
        assert "injected fault" in r.json()["error"]["message"]
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 1, stderr
    assert "injected fault" in stderr and "exiting (--exit-on-engine-failure)" in stderr
