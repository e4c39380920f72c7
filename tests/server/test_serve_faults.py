"""`gpt2kit serve` under load and faults, black-box over HTTP on loopback: a real server
process, clients that vanish mid-stream, a client that stops reading, more requests than
the queue holds, and SIGKILL of the server itself followed by a restart.

Only the HTTP API is used (/v1/completions, /health), so these hold for any engine behind
it. A watcher polls /health through every scenario: the server must answer it each time.
Request counts and waits are bounded; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pause_helpers import pause_env, wait_paused
from server_helpers import MODEL_NAME, make_model_dir

N_CTX = 4096  # long enough that a full-length request runs for minutes: cancelling must free it
MAX_PENDING = 4
LONG = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": N_CTX - 8, "temperature": 1.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve-faults"), n_positions=N_CTX)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `gpt2kit serve` process; `start()` again after a kill restarts it on the same port."""

    def __init__(self, model_dir: Path, port: int) -> None:
        self.model_dir, self.port = model_dir, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, *, pause_at: str | None = None, marker: Path | None = None) -> None:
        """Start (or restart) the server; `pause_at` arms a pause point (gpt2kit.faults) in it."""
        cmd = [
            sys.executable,
            "-m",
            "gpt2kit",
            "serve",
            "--model",
            str(self.model_dir),
            "--model-name",
            MODEL_NAME,
        ]
        cmd += ["--port", str(self.port), "--threads", "1", "--max-pending", str(MAX_PENDING), "--no-compile"]
        cmd += ["--max-batch-size", str(16 * MAX_PENDING)]  # every row of every slot decodes at once
        env = pause_env(marker, pause_at)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            assert self.proc.poll() is None, "gpt2kit serve exited during start-up"
            assert time.monotonic() < deadline, "gpt2kit serve did not start"
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def load(self) -> int:
        return httpx.get(f"{self.url}/health", timeout=30).json()["requests_in_flight"]

    def wait_idle(self) -> None:
        """Until no request is in flight (bounded): disconnected clients' rows must be freed."""
        deadline = time.monotonic() + 60
        while (load := self.load()) != 0:
            assert time.monotonic() < deadline, f"{load} requests still held after every client left"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[Server]:
    s = Server(model_dir, free_port())
    s.start()
    yield s
    s.kill()


@contextlib.contextmanager
def health_watch(server: Server) -> Iterator[list[str]]:
    """Poll /health every 50 ms while the block runs; the block's end asserts it always answered."""
    problems: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    r = client.get(f"{server.url}/health")
                    if r.status_code != 200 or r.json()["status"] != "ok":
                        problems.append(f"/health answered {r.status_code}: {r.text}")
                except httpx.HTTPError as e:
                    problems.append(f"/health failed: {e!r}")
                stop.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield problems
    finally:
        stop.set()
        thread.join(timeout=60)
    assert problems == []


def concurrently(fn, k: int) -> list:
    """Run `fn()` in `k` threads at once; their results."""
    results: list = []
    lock = threading.Lock()

    def run() -> None:
        r = fn()
        with lock:
            results.append(r)

    threads = [threading.Thread(target=run) for _ in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def complete(server: Server, **changes) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "seed": 1, **changes}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def test_clients_that_disconnect_mid_stream_free_their_slots(server: Server) -> None:
    with health_watch(server):
        for _ in range(3):
            streams = []
            for _ in range(MAX_PENDING):  # every slot the server has
                client = httpx.Client(timeout=120)
                body = {**LONG, "stream": True, "n": 16}
                cm = client.stream("POST", f"{server.url}/v1/completions", json=body)
                response = cm.__enter__()
                assert response.status_code == 200
                lines = response.iter_lines()
                for _ in range(random.randint(1, 20)):  # leave at a different moment each time
                    next(lines)
                streams.append((client, cm, lines))  # kept: a dropped iterator closes its stream
            assert server.load() == MAX_PENDING
            for client, cm, _ in streams:  # gone without reading the rest: the sockets close
                cm.__exit__(None, None, None)
                client.close()
            server.wait_idle()
            # Every slot is usable again.
            results = concurrently(lambda: complete(server), MAX_PENDING)
            assert [r.status_code for r in results] == [200] * MAX_PENDING


def test_a_slow_client_does_not_stall_the_others(server: Server) -> None:
    """One client asks for megabytes of streamed logprobs and reads none of it; the rest are served."""
    slow_body = {**LONG, "stream": True, "n": 16, "logprobs": 20, "max_tokens": 400}  # ~6 MB of events
    with health_watch(server), socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: it stalls early
        slow.settimeout(120)
        slow.connect(("127.0.0.1", server.port))
        payload = json.dumps(slow_body).encode()
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        first = slow.recv(1024)
        assert first.startswith(b"HTTP/1.1 200")
        # The slow client now reads nothing more. Others come and go, several rounds.
        for _ in range(3):
            results = concurrently(lambda: complete(server, max_tokens=8), MAX_PENDING - 1)
            assert [r.status_code for r in results] == [200] * (MAX_PENDING - 1)
            assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in results)
        # The slow client can still read its whole stream, to the end.
        slow.settimeout(120)
        received = first
        # The body is chunked: it ends with the zero-length chunk, which may come in the same
        # read as the last event or in a later one.
        while not received.endswith(b"\r\n0\r\n\r\n") and (chunk := slow.recv(1 << 16)):
            received += chunk
        assert received.endswith(b"\r\n0\r\n\r\n")
        assert received[: -len(b"\r\n0\r\n\r\n")].rstrip().endswith(b"data: [DONE]")
    server.wait_idle()


def test_more_requests_than_the_queue_holds_get_429_with_retry_after(model_dir: Path, tmp_path: Path) -> None:
    """A burst of 4x the queue while the engine is held before its first step (a pause point,
    gpt2kit.faults), so no request can finish and make room, whatever the machine's speed:
    exactly `MAX_PENDING` are admitted and the rest get 429. Let go, the admitted ones
    complete, and a client that honours Retry-After gets through."""
    s, marker = Server(model_dir, free_port()), tmp_path / "paused"
    s.start(pause_at="serve.engine_step:1", marker=marker)
    try:
        with health_watch(s), ThreadPoolExecutor(4 * MAX_PENDING) as pool:
            burst = [
                pool.submit(complete, s, max_tokens=random.randint(20, 60)) for _ in range(4 * MAX_PENDING)
            ]
            wait_paused(s.proc, marker)
            deadline = time.monotonic() + 120
            # Until every request is admitted (held) or answered (refused); more than
            # MAX_PENDING admitted would never get here.
            while (refused := sum(f.done() for f in burst)) < 3 * MAX_PENDING or s.load() < MAX_PENDING:
                assert time.monotonic() < deadline, f"{refused} answered, {s.load()} held"
                time.sleep(0.01)
            assert s.load() == MAX_PENDING
            marker.unlink()  # the engine goes on
            responses = [f.result(timeout=120) for f in burst]
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * MAX_PENDING + [429] * (3 * MAX_PENDING), codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
            else:
                assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        s.wait_idle()
        # A client that honours Retry-After gets through.
        assert complete(s).status_code == 200
    finally:
        s.kill()


def test_sigkill_under_load_then_restart(model_dir: Path, tmp_path: Path) -> None:
    """The server process dies mid-load; clients get an error, not a hang; the restarted
    server serves again on the same port. Each round the engine pauses before a chosen
    decoding step (gpt2kit.faults) and the server is killed there, with every client's
    request held: no sleep decides, so no stream can have finished first on a fast machine."""
    s, marker = Server(model_dir, free_port()), tmp_path / "paused"
    # The end-of-text token banned: a sampled one would end a request before the kill
    # (about 1 in 50,000 per token), and the kill must find all of them running.
    body = {**LONG, "stream": True, "logit_bias": {"50256": -100}}

    def stream() -> str:
        """How the stream ended: "done" (it finished) or "cut" (the server died under it)."""
        try:
            with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=120) as r:
                lines = list(r.iter_lines())
            return "done" if lines and lines[-1] == "data: [DONE]" else "cut"
        except httpx.HTTPError:  # what a client sees when the server dies mid-response
            return "cut"

    for step in (1, 40, 300):  # before the first decoding step, and later ones
        s.start(pause_at=f"serve.engine_step:{step}", marker=marker)
        with ThreadPoolExecutor(MAX_PENDING) as pool:
            clients = [pool.submit(stream) for _ in range(MAX_PENDING)]
            wait_paused(s.proc, marker)
            deadline = time.monotonic() + 60
            while s.load() < MAX_PENDING:  # all of them admitted (HTTP answers while the engine waits)
                ended = [c.result() for c in clients if c.done()]
                assert time.monotonic() < deadline, (
                    f"{s.load()} of {MAX_PENDING} requests held; ended: {ended}"
                )
                time.sleep(0.01)
            s.kill()
            marker.unlink()
            outcome = [c.result(timeout=120) for c in clients]  # a client that hung fails here
        assert outcome == ["cut"] * MAX_PENDING  # cut short, and told so by the connection
    s.start()
    try:
        assert complete(s).status_code == 200
        assert s.load() == 0
    finally:
        s.kill()
