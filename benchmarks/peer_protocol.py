"""The protocol bench_generate speaks with a peer's runner (llama_peer_runner.py,
vllm_peer_runner.py), shared by both. It runs in the peer's own Python, so it imports only
the standard library.

The runner gets its request as JSON in argv[1], says one line about itself, then answers
one line per command on stdin: "warm" (a 4-token run, answers "ok"), "rate" (decode
tokens/s: rows x (new - 1) / (time of a `new`-token run - time of a 1-token run), then
anything `rate` adds) and "tokens" (the greedy tokens of a `new`-token run, JSON, one list
per row).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO


def answers() -> TextIO:
    """The protocol's own stdout; fd 1 becomes stderr, so whatever the engine (or a process it
    spawns) prints goes there instead of into the answers."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def decode_rate(
    run: Callable[[int], object], *, rows: int, new: int, before: Callable[[], None] = lambda: None
) -> float:
    """Decode tokens/s of `run(n)` (greedy n tokens for `rows` rows); `before()` runs just
    before the timed `new`-token run (a peer resetting its own counters)."""
    run(1)  # untimed: pages dropped while the other systems ran come back first
    t0 = time.perf_counter()
    run(1)
    t_1 = time.perf_counter() - t0
    before()
    t0 = time.perf_counter()
    run(new)
    t_new = time.perf_counter() - t0
    return rows * (new - 1) / (t_new - t_1) if t_new > t_1 else float("nan")


def serve(reply: TextIO, *, run: Callable[[int], list[list[int]]], rate: Callable[[], str], new: int) -> None:
    """Answer the commands on stdin until it closes."""
    for line in sys.stdin:
        command = line.strip()
        if command == "warm":
            run(4)
            print("ok", file=reply, flush=True)
        elif command == "rate":
            print(rate(), file=reply, flush=True)
        elif command == "tokens":
            print(json.dumps(run(new)), file=reply, flush=True)
