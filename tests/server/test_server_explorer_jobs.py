"""The Explorer's model calls go through the worker: they run on the engine thread between
decode steps, within `TimeShare`'s rule, behind a bounded queue.

Checked on a real server on loopback: every Explorer endpoint answers exactly as it does on
an idle server while a long completion streams; the engine thread's own log of steps and
jobs, replayed, obeys the rule (a job starts only when the decode time since has paid for
the Explorer's, never two jobs without a step between them while rows decode); a full queue
answers 429 with a clear JSON error. Counts and the replayed durations are what is
asserted, never a wall-clock time.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gpt2kit.model import GPT2
from gpt2kit.server import explorer
from gpt2kit.server.timeshare import Slice, TimeShare
from server_helpers import MODEL_NAME, check_error, make_model_dir, running_server

TEXT = "The robot picked up the ball because it"
CALLS = [
    ("/api/next", {"text": TEXT, "k": 5, "temperature": 0.8, "top_k": 40, "seed": 7}),
    ("/api/surprise", {"text": TEXT}),
    ("/api/attention", {"text": TEXT, "layer": 1, "head": 2, "position": 4}),
    ("/api/attention/grid", {"text": TEXT, "layer": 0}),
    ("/api/lens", {"text": TEXT, "k": 3}),
    ("/api/lens/grid", {"text": TEXT}),
    ("/api/attribution", {"text": TEXT}),
]
N_CTX = 4096


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("explorer-jobs"), n_positions=N_CTX)


def wait_until(ready, *, limit_s: float = 60) -> None:
    """Poll `ready()` until it holds (bounded; a bound, not a timed assertion)."""
    deadline = time.monotonic() + limit_s
    while not ready():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.005)


def replay(log: list[Slice], share: float) -> tuple[int, int]:
    """Check the rule on the engine thread's log; (Explorer jobs run while decoding, steps)."""
    start = next(i for i, s in enumerate(log) if s.kind == "idle")  # a known balance: 0
    expected = next((s.seconds for s in reversed(log[:start]) if s.kind == "job"), 0.0)
    balance, busy_jobs, steps, steps_since_job = 0.0, 0, 0, None
    for s in log[start:]:
        if s.kind == "idle":
            balance, steps_since_job = 0.0, None
        elif s.kind == "step":
            balance = min(expected, balance + share * s.seconds)
            steps += 1
            steps_since_job = None if steps_since_job is None else steps_since_job + 1
        else:
            if s.busy:
                assert balance >= expected, f"a job started with {balance:.6f}s earned, not {expected:.6f}s"
                assert steps_since_job != 0, "two Explorer jobs ran with no decode step between them"
                balance -= s.seconds
                busy_jobs += 1
                steps_since_job = 0
            expected = s.seconds
    return busy_jobs, steps


def test_timeshare_rule() -> None:
    share = TimeShare(share=0.1)
    assert share.may_run(busy=True)  # nothing to pay for yet
    share.ran_job(0.010, busy=True)  # 10 ms: it and the next are paid by 200 ms of decoding
    for _ in range(19):
        share.ran_step(0.010)
        assert not share.may_run(busy=True)
        assert share.may_run(busy=False)  # nothing decoding: nothing to protect
    share.ran_step(0.0101)  # (a hair over: sums of floats)
    assert share.may_run(busy=True)
    for _ in range(100):  # decoding with no Explorer waiting saves one job's worth, no more
        share.ran_step(0.010)
    assert share.balance == pytest.approx(0.010)
    share.ran_job(0.030, busy=True)  # longer than saved: 20 ms owed, and the next expected at 30
    assert share.balance == pytest.approx(-0.020) and not share.may_run(busy=True)
    share.ran_job(5.0, busy=False)  # while idle, jobs cost nothing...
    share.idle()
    assert share.balance == 0 and not share.may_run(busy=True)  # ...but the next busy one is prepaid
    for _ in range(49):
        share.ran_step(1.0)
    assert not share.may_run(busy=True)
    share.ran_step(1.01)  # 50 s of decoding: 5 s earned
    assert share.may_run(busy=True)
    assert [s.kind for s in share.log][-52:-50] == ["job", "idle"]


def test_explorer_answers_while_a_completion_streams(model_dir: Path) -> None:
    with running_server(model_dir) as s, httpx.Client(base_url=s.url, timeout=120) as client:
        idle = [client.post(path, json=body) for path, body in CALLS]
        assert [r.status_code for r in idle] == [200] * len(CALLS), [r.text for r in idle]
        # The server's answer is the model's: surprise against the function on a fresh load.
        ids = client.post("/tokenize", json={"prompt": TEXT}).json()["tokens"]
        direct = explorer.surprise(GPT2.from_pretrained(model_dir), ids, bos=50256)
        assert [t["logprob"] for t in idle[1].json()["tokens"]] == pytest.approx(direct.logprobs, abs=1e-5)

        # 8 rows: wide steps, so the decoding that pays for each Explorer job takes fewer tokens.
        body = {"model": MODEL_NAME, "prompt": "Once", "max_tokens": N_CTX - 8, "n": 8, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # decoding now
            assert s.worker.engine.busy
            # Two clients keep the Explorer busy, between them through every endpoint twice.
            with ThreadPoolExecutor(2) as pool:
                busy = list(pool.map(lambda call: client.post(call[0], json=call[1]), CALLS * 2))
            still_streaming = s.worker.engine.busy
            # Copied on the engine thread, which appends to it.
            log = s.worker.call(lambda: list(s.worker.share.log)).result(timeout=60)
        assert still_streaming, "the completion ended before the Explorer was answered"
        assert [r.json() for r in busy] == [r.json() for r in idle] * 2
        busy_jobs, steps = replay(log, s.worker.share.share)
        assert busy_jobs == len(CALLS) * 2  # every one ran between decode steps
        assert steps > busy_jobs


def test_a_full_explorer_queue_answers_429(model_dir: Path) -> None:
    with running_server(model_dir, max_explorer_jobs=2) as s:
        release = threading.Event()
        held = s.worker.call(release.wait)  # the engine thread waits here
        wait_until(held.running)
        with ThreadPoolExecutor(2) as pool:
            queued = [
                pool.submit(httpx.post, f"{s.url}{path}", json=body, timeout=60) for path, body in CALLS[:2]
            ]
            wait_until(lambda: s.worker.jobs_waiting == 2)
            refused = httpx.post(f"{s.url}/api/attention", json=CALLS[2][1], timeout=60)
            check_error(refused, 429, None)
            assert int(refused.headers["Retry-After"]) >= 1
            error = refused.json()["error"]
            assert error["code"] == "rate_limit_exceeded"
            assert "2 Explorer requests are already waiting" in error["message"]
            release.set()
            answers = [q.result(timeout=60) for q in queued]
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        assert json.dumps(answers[1].json()["tokens"][0]).startswith('{"id": 464')  # "The"
        assert httpx.post(f"{s.url}/api/attention", json=CALLS[2][1], timeout=60).status_code == 200
