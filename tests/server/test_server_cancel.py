"""Cancellation is race-free: a request cancelled at any moment, from the moment it is
submitted on, frees every row it had or would have had.

`Request.cancel` is a message to the engine thread, which alone touches a request's rows
(server/worker.py). Checked on the worker with cancels sent right after submit (the gap
where the old code lost rows), and through a real server on loopback with 200 streams
whose clients vanish at random moments: afterwards nothing is in flight, no engine slot
holds a row, and a new request runs to its full length.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import FinishEvent
from gpt2kit.model import GPT2
from gpt2kit.server.worker import Worker
from server_helpers import MODEL_NAME, make_model_dir, running_server

N_CTX = 4096  # a row left running would hold its slot for minutes: a leak can't hide
EOS = 50256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("cancel"), n_positions=N_CTX)


def assert_idle(worker: Worker) -> None:
    """Wait (bounded) until nothing is in flight, then check the engine holds no row."""
    deadline = time.monotonic() + 60
    while worker.load:
        assert time.monotonic() < deadline, f"{worker.load} requests still held after every cancel"
        time.sleep(0.01)
    deadline = time.monotonic() + 60
    while worker.engine.busy:  # the last step may still be finishing
        assert time.monotonic() < deadline, "engine rows still running with no request in flight"
        time.sleep(0.01)
    assert worker.engine.rows == [] and not worker.engine.waiting


def test_cancel_right_after_submit_frees_every_row(model_dir: Path) -> None:
    model = GPT2.from_pretrained(model_dir)
    worker = Worker(model, eos_token_id=EOS, slots=8)
    rng = random.Random(0)

    async def one(i: int) -> list[str]:
        sink: asyncio.Queue = asyncio.Queue()
        n = rng.randint(1, 4)
        request = worker.submit([[15496, 995]], SamplingConfig(max_new_tokens=4000, n=n, seed=i), sink=sink)
        for _ in range(rng.choice([0, 0, 1, 3, 20])):  # cancel at once, or after a few loop turns
            await asyncio.sleep(0)
        request.cancel()
        reasons = []
        while len(reasons) < n:
            event = await asyncio.wait_for(sink.get(), timeout=60)
            if isinstance(event, FinishEvent):
                reasons.append(event.reason)
        return reasons

    async def storm() -> list[list[str]]:
        results = []
        for start in range(0, 200, 8):  # 8 at a time, 200 in all
            results += await asyncio.gather(*(one(i) for i in range(start, start + 8)))
        return results

    try:
        results = asyncio.run(storm())
        assert all(r == ["cancelled"] * len(r) for r in results), results
        assert_idle(worker)
    finally:
        worker.stop()


def stream_and_vanish(port: int, rng: random.Random) -> str:
    """Open a long stream and close the socket at a random moment; how far it got."""
    body = {
        "model": MODEL_NAME,
        "prompt": "Once upon a time",
        "max_tokens": N_CTX - 16,
        "n": rng.randint(1, 2),
        "stream": True,
        "temperature": 1.0,
    }
    payload = json.dumps(body).encode()
    moment = rng.choice(["sent", "sleep", "headers", "events"])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        if moment == "sleep":
            time.sleep(rng.uniform(0, 0.02))
        elif moment in ("headers", "events"):
            events = rng.randint(1, 30)
            seen = b""
            while b"\r\n\r\n" not in seen if moment == "headers" else seen.count(b"data: ") < events:
                chunk = sock.recv(4096)
                assert chunk, "the server closed the stream first"
                seen += chunk
            assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    return moment  # the socket closes here, mid-request


def test_200_streams_cancelled_at_random_moments_leave_nothing_running(model_dir: Path) -> None:
    with running_server(model_dir, max_batch_size=8) as s:
        port = int(s.url.rsplit(":", 1)[1])
        rngs = [random.Random(i) for i in range(200)]
        with ThreadPoolExecutor(8) as pool:
            moments = list(pool.map(lambda rng: stream_and_vanish(port, rng), rngs))
        assert {"sent", "sleep", "headers", "events"} <= set(moments)
        assert_idle(s.worker)
        # Every slot is free: a new request runs to its full length.
        r = httpx.post(
            f"{s.url}/v1/completions",
            json={
                "model": MODEL_NAME,
                "prompt": "Hello",
                "max_tokens": 64,
                "seed": 3,
                "logit_bias": {str(EOS): -100},  # no early end-of-text
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 64
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert s.worker.load == 0
