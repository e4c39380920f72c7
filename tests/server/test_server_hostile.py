"""Malformed and hostile requests: each gets the right 4xx with an OpenAI-style JSON error,
and the server keeps serving afterwards."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from gpt2kit.server.openai_completions import Limits
from server_helpers import MODEL_NAME, check_error, make_model_dir, running_server

N_CTX = 512
OK = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("hostile"), n_positions=N_CTX)


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, limits=Limits(max_n=8, max_tokens=400), max_body_bytes=1_000_000) as s:
        yield s


def body(**changes):
    out = dict(OK)
    for k, v in changes.items():
        if v is DROP:
            out.pop(k)
        else:
            out[k] = v
    return out


DROP = object()

# (name, JSON body, expected status, expected "param")
CASES = [
    ("model missing", body(model=DROP), 400, "model"),
    ("prompt missing", body(prompt=DROP), 400, "prompt"),
    ("unknown model", body(model="gpt-4"), 404, "model"),
    ("model not a string", body(model=3), 400, "model"),
    ("prompt a number", body(prompt=12), 400, "prompt"),
    ("prompt a dict", body(prompt={"text": "x"}), 400, "prompt"),
    ("prompt booleans", body(prompt=[True, False]), 400, "prompt"),
    ("prompt mixed list", body(prompt=["a", 1]), 400, "prompt"),
    ("prompt empty list", body(prompt=[]), 400, "prompt"),
    ("prompt float ids", body(prompt=[1.5, 2.0]), 400, "prompt"),
    ("negative token id", body(prompt=[-1]), 400, "prompt"),
    ("token id past vocab", body(prompt=[50257]), 400, "prompt"),
    ("5000-token prompt", body(prompt=" hello" * 5000), 400, "prompt"),
    ("prompt + max_tokens over context", body(prompt=" hello" * 500, max_tokens=100), 400, "max_tokens"),
    ("too many prompts", body(prompt=["a"] * 65), 400, "prompt"),
    ("max_tokens negative", body(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens huge", body(max_tokens=10**12), 400, "max_tokens"),
    ("max_tokens over server cap", body(max_tokens=401), 400, "max_tokens"),
    ("max_tokens a string", body(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens a float", body(max_tokens=2.5), 400, "max_tokens"),
    ("temperature negative", body(temperature=-0.1), 400, "temperature"),
    ("temperature 3", body(temperature=3), 400, "temperature"),
    ("temperature a string", body(temperature="hot"), 400, "temperature"),
    ("top_p 0", body(top_p=0), 400, "top_p"),
    ("top_p 2", body(top_p=2), 400, "top_p"),
    ("n 0", body(n=0), 400, "n"),
    ("n huge", body(n=10**6), 400, "n"),
    ("n over server cap", body(n=9), 400, "n"),
    ("logprobs 21", body(logprobs=21), 400, "logprobs"),
    ("logprobs negative", body(logprobs=-1), 400, "logprobs"),
    ("echo a string", body(echo="yes"), 400, "echo"),
    ("stream a number", body(stream=1), 400, "stream"),
    ("stop a number", body(stop=5), 400, "stop"),
    ("five stop strings", body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("seed a string", body(seed="42"), 400, "seed"),
    ("seed too big", body(seed=2**70), 400, "seed"),
    ("unknown field", body(foo="bar"), 400, "foo"),
    ("misspelt field", body(max_token=5), 400, "max_token"),
    ("frequency_penalty out of range", body(frequency_penalty=2.5), 400, "frequency_penalty"),
    ("presence_penalty out of range", body(presence_penalty=5), 400, "presence_penalty"),
    ("logit_bias key not an id", body(logit_bias={"eos": -100}), 400, "logit_bias"),
    ("logit_bias id past vocab", body(logit_bias={"50257": 1}), 400, "logit_bias"),
    ("logit_bias value over 100", body(logit_bias={"50256": 101}), 400, "logit_bias"),
    ("top_k a float", body(top_k=2.5), 400, "top_k"),
    ("top_k below -1", body(top_k=-2), 400, "top_k"),
    ("min_p over 1", body(min_p=1.5), 400, "min_p"),
    ("repetition_penalty 0", body(repetition_penalty=0), 400, "repetition_penalty"),
    ("suffix set", body(suffix="end"), 400, "suffix"),
    ("best_of != n", body(best_of=3), 400, "best_of"),
    ("stream_options unknown key", body(stream=True, stream_options={"x": 1}), 400, "stream_options"),
    ("truncate_prompt_tokens 0", body(truncate_prompt_tokens=0), 400, "truncate_prompt_tokens"),
    ("body a list", [OK], 400, None),
    ("body a string", "hello", 400, None),
    ("body null", None, 400, None),
]


def still_serving(server) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json=OK, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(("name", "payload", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_invalid_json_fields(server, name, payload, status, param) -> None:
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=json.dumps(payload),
        timeout=60,
        headers={"Content-Type": "application/json"},
    )
    check_error(r, status, param)


@pytest.mark.parametrize(
    ("name", "raw", "status"),
    [
        ("invalid UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400),
        ("truncated JSON", b'{"model": "tiny", "prompt": "x"', 400),
        ("not JSON at all", b"model=tiny&prompt=x", 400),
        ("empty body", b"", 400),
        ("JSON with NaN", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400),
        ("10 MB body", b'{"model": "tiny", "prompt": "' + b"a" * 10_000_000 + b'"}', 413),
    ],
)
def test_raw_bodies(server, name, raw, status) -> None:
    r = httpx.post(
        f"{server.url}/v1/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=60
    )
    check_error(r, status, None)


def test_chunked_body_over_the_limit(server) -> None:
    def chunks():
        for _ in range(20):
            yield b"a" * 100_000

    r = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=60)
    check_error(r, 413, None)


def raw_exchange(url: str, head: bytes, body_parts) -> bytes:
    """Send a whole request over a plain socket before reading, then read to the server's close.

    A reset instead of a close raises ConnectionResetError here, as it does in any client.
    """
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def parse_response(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


TEN_MB = b'{"model": "tiny", "prompt": "' + b"a" * 10_000_000 + b'"}'


def test_10mb_body_gets_a_readable_413_and_a_clean_close(server) -> None:
    """The client writes all 10 MB before it reads: the 413 must still be there to read."""
    head = f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {len(TEN_MB)}\r\n\r\n".encode()
    status, headers, body = parse_response(raw_exchange(server.url, head, [TEN_MB]))
    assert status == 413
    assert headers["connection"] == "close"
    assert body["error"]["code"] == "request_too_large"
    still_serving(server)


def test_10mb_chunked_body_gets_a_readable_413(server) -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    step = 1 << 20
    parts = [
        b"%x\r\n%s\r\n" % (len(p), p) for p in (TEN_MB[i : i + step] for i in range(0, len(TEN_MB), step))
    ]
    status, headers, body = parse_response(raw_exchange(server.url, head, [*parts, b"0\r\n\r\n"]))
    assert status == 413 and headers["connection"] == "close"
    assert body["error"]["code"] == "request_too_large"


def test_huge_declared_body_is_refused_without_reading_it(server) -> None:
    """Past the drain bound the server answers at once; it never reads a 10 GB body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        # Headers only: the 413 must come without the body. (Bytes sent after it would sit
        # unread when the server closes, and the kernel's reset could then eat the answer:
        # docs/serving.md says so.)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000000\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status, headers, _ = parse_response(received)
    assert status == 413 and headers["connection"] == "close"
    still_serving(server)


def test_wrong_method_and_path(server) -> None:
    check_error(httpx.get(f"{server.url}/v1/completions"), 405, None)
    check_error(httpx.post(f"{server.url}/v1/chat/nothing", json=OK), 404, None)


def test_explorer_endpoints_validate_too(server) -> None:
    check_error(httpx.post(f"{server.url}/api/next", json={"text": "x", "k": 0}), 400, "k")
    check_error(httpx.post(f"{server.url}/api/next", json={"txt": "x"}), 400, "text")  # text is missing
    check_error(httpx.post(f"{server.url}/api/attention", json={"text": "x", "layer": 99}), 400, "layer")
    check_error(httpx.post(f"{server.url}/api/attention", json={"text": "x", "head": 99}), 400, "head")
    check_error(httpx.post(f"{server.url}/api/lens", json={"text": " a" * 1000}), 400, "text")


def test_truncation_is_explicit(server) -> None:
    payload = body(prompt=" hello" * 5000, truncate_prompt_tokens=10, max_tokens=2)
    r = httpx.post(f"{server.url}/v1/completions", json=payload, timeout=60)
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == 10


def test_429_when_the_queue_is_full(model_dir) -> None:
    with running_server(model_dir, max_pending=1) as s:
        # Hold the engine inside its decode step until the second request has been answered.
        gate = threading.Event()
        model = s.worker.model
        step = model.decode_step

        def held_step(*args):
            gate.wait(30)
            return step(*args)

        model.decode_step = held_step
        try:
            blocker = body(prompt=[464], max_tokens=50, seed=0, stream=True)
            with httpx.stream("POST", f"{s.url}/v1/completions", json=blocker, timeout=60) as stream:
                next(stream.iter_lines())  # the blocker is running (its first token came from the prefill)
                r = httpx.post(f"{s.url}/v1/completions", json=OK, timeout=60)
                check_error(r, 429, None)
                assert int(r.headers["retry-after"]) >= 1
                gate.set()
        finally:
            gate.set()
            del model.decode_step
        deadline = time.monotonic() + 10
        while s.worker.load and time.monotonic() < deadline:  # the client left: its row was cancelled
            time.sleep(0.02)
        still_serving(s)


def test_request_timeout(model_dir) -> None:
    with running_server(model_dir, limits=Limits(request_timeout=0.05)) as s:
        r = httpx.post(f"{s.url}/v1/completions", json=body(max_tokens=N_CTX - 2), timeout=60)
        check_error(r, 504, None)
        deadline = time.monotonic() + 10
        while s.worker.load and time.monotonic() < deadline:  # the timed-out row was cancelled
            time.sleep(0.02)
        assert s.worker.load == 0


def test_still_serving_after_all_that(server) -> None:
    for _, payload, _, _ in CASES[:10]:
        httpx.post(f"{server.url}/v1/completions", json=payload, timeout=60)
    still_serving(server)
    assert httpx.get(f"{server.url}/health").json()["requests_in_flight"] == 0
