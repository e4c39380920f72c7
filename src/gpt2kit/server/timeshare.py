"""How much of the engine thread the Explorer may take while completions decode.

The Explorer's forward passes run on the engine thread, between decode steps (the worker's
jobs). Generation goes first: while rows are decoding, Explorer jobs are paid for in
advance. Each decode step earns `share` of its duration; each job costs its own; a job may
start only when what has been earned covers what the last job cost (the best guess of what
the next one will). Savings are capped at that one job, so an idle Explorer builds no burst
for later, and a new completion starts with nothing saved: its first Explorer job waits
until 1/share of a job's time has been spent decoding. While nothing decodes, jobs run back
to back and cost nothing: there is no decoding to protect.

With `share` = 1/16 Explorer jobs take at most about 6% of a busy engine thread (give or
take the difference between one job's length and the next), so decoding keeps about 0.94x
its speed alone (benchmarks/bench_serve.py --explorer-load measures it). Jobs are not
preempted: the longest pause a stream sees is one job, plus the one that was running when
it arrived.

>>> share = TimeShare(share=0.25)
>>> share.may_run(busy=True)  # no job has run yet: nothing to pay for
True
>>> share.ran_job(0.010, busy=True); share.may_run(busy=True)
False
>>> for _ in range(8): share.ran_step(0.010)  # 80 ms of decoding earns 20 ms: the debt and the next job
>>> share.may_run(busy=True)
True
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Slice:
    """One piece of the engine thread's work: a decode step or an Explorer job."""

    kind: str  # "step", "job", or "idle" (nothing decoding: the balance was reset)
    seconds: float
    busy: bool  # rows were decoding when it ran (True for a step, False for idle)


class TimeShare:
    """The Explorer's budget on the engine thread (see the module docstring).

    `log` keeps the last `keep` slices in order (engine thread only), so a test can replay
    the rule against the very durations it was given.
    """

    def __init__(self, *, share: float, keep: int = 4096) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.share = share
        self.balance = 0.0  # seconds of Explorer work earned and not spent
        self.expected = 0.0  # the last job's seconds: what the next one must have earned
        self.log: deque[Slice] = deque(maxlen=keep)

    def may_run(self, *, busy: bool) -> bool:
        """Whether a waiting job may run now (`busy`: rows are decoding)."""
        return not busy or self.balance >= self.expected

    def ran_step(self, seconds: float) -> None:
        self.balance = min(self.expected, self.balance + self.share * seconds)
        self.log.append(Slice("step", seconds, True))

    def ran_job(self, seconds: float, *, busy: bool) -> None:
        if busy:
            self.balance -= seconds
        self.expected = seconds
        self.log.append(Slice("job", seconds, busy))

    def idle(self) -> None:
        """Nothing is decoding: the next completion starts with nothing saved."""
        self.balance = 0.0
        if not self.log or self.log[-1].kind != "idle":
            self.log.append(Slice("idle", 0.0, False))
