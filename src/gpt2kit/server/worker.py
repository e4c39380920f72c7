"""The server's side of the engine: one background thread owns the model and its `Engine`.

Requests come from the HTTP event loop (`submit`), join the engine's running batch at the
next step (continuous batching over its cache slots) and get their events back on their own
asyncio queue, one wake-up per event loop per step. Generation is exactly `complete`'s:
the same engine, sampler and row seeds (row r of a request samples with `seed + r`).
With `batching=False` the worker serves one request at a time (the baseline of
benchmarks/bench_serve.py).

>>> worker = Worker(model, eos_token_id=50256)  # doctest: +SKIP
>>> request = worker.submit([[15496]], SamplingConfig(max_new_tokens=8, seed=0), sink=queue)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import DecodeStep, Engine, Event, FinishEvent, Row
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.openmp import release_thread_pool

log = logging.getLogger(__name__)


class WorkerBusy(Exception):
    """The worker already holds as many requests as it may; the caller should answer 429."""


@dataclass(frozen=True)
class Failed:
    """Row `row` (None: every row of the request) can't finish: the engine failed (the server
    answers 500) or the server is shutting down."""

    row: Row | None
    message: str


@dataclass(eq=False)
class Request:
    """One request's rows (prompt i's sample j is row i * n + j) and where their events go."""

    prompts: list[list[int]]
    config: SamplingConfig
    prompt_logprobs: bool
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    rows: list[Row] = field(default_factory=list)
    open: int = 0  # rows not finished yet
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop every row at the next step (the client left, or all choices are done)."""
        self.cancelled = True
        for row in self.rows:
            row.cancel()


class Worker:
    """Runs the engine in a background thread (see the module docstring).

    `slots` is the engine's cache slots (rows decoded together), `max_pending` the requests
    held (running and waiting) before `submit` raises WorkerBusy, `step` the decode step.
    `deterministic`: the engine's (`gpt2kit.generation.engine`): a request's tokens are the
    same bits however many other requests run beside it.
    """

    def __init__(
        self,
        model: GPT2,
        *,
        eos_token_id: int,
        slots: int = 8,
        max_pending: int = 64,
        batching: bool = True,
        step: DecodeStep | None = None,
        deterministic: bool = False,
    ) -> None:
        self.model = model
        self.deterministic = deterministic
        self.eos = eos_token_id
        self.n_ctx = model.config.n_positions
        self.slots = slots
        self.max_pending = max_pending
        self.batching = batching
        self._step = step
        self.engine = self._new_engine()
        self._cond = threading.Condition()
        self._inbox: deque[Request] = deque()  # submitted, not yet handed to the engine
        self._requests: set[Request] = set()  # submitted and not finished
        self._stopped = False
        # Loading the model and allocating the cache gave this thread OpenMP workers; with
        # the engine thread's own, the process would hold more than its cores and every
        # step would pay for parked workers (gpt2kit.openmp).
        release_thread_pool()
        self._thread = threading.Thread(target=self._loop, name="gpt2kit-engine", daemon=True)
        self._thread.start()

    def _new_engine(self) -> Engine:
        return Engine(
            self.model,
            slots=self.slots,
            eos_token_id=self.eos,
            step=self._step,
            deterministic=self.deterministic,
        )

    # --- the event loop's side ----------------------------------------------------------

    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        config: SamplingConfig,
        *,
        sink: asyncio.Queue,
        prompt_logprobs: bool = False,
    ) -> Request:
        """Queue `config.n` samples of each prompt; their events arrive in `sink` as `Event`s
        (and `Failed`). Called from the event loop that reads `sink`."""
        request = Request(
            [list(p) for p in prompts], config, prompt_logprobs, asyncio.get_running_loop(), sink
        )
        with self._cond:
            if self._stopped:
                raise RuntimeError("the worker is stopped")
            if len(self._requests) >= self.max_pending:
                raise WorkerBusy(f"{self.max_pending} requests are already queued or running")
            self._requests.add(request)
            self._inbox.append(request)
            self._cond.notify()
        return request

    @property
    def load(self) -> int:
        """Requests queued or running (what `max_pending` caps)."""
        with self._cond:
            return len(self._requests)

    def stop(self) -> None:
        """End the thread; rows still queued or running end as 'cancelled'."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # --- the engine thread --------------------------------------------------------------

    def _loop(self) -> None:
        owners: dict[Row, Request] = {}
        while True:
            with self._cond:
                while not self._stopped and not self._inbox and not self.engine.busy:
                    self._cond.wait()
                if self._stopped:
                    break
                admitted = self._take()
            for request in admitted:
                self._add(request, owners)
            try:
                events: list = self.engine.step()
            except Exception as e:  # keep serving: fail this batch's rows, not the server
                log.exception("engine step failed")
                events = [Failed(row, f"{type(e).__name__}: {e}") for row in owners]
                self.engine = self._new_engine()
            self._deliver(events, owners)
        with self._cond:
            leftover = set(owners.values()) | set(self._inbox)
            self._inbox.clear()
            self._requests.clear()
        for request in leftover:
            self._post(request, [Failed(None, "the server is shutting down")])

    def _take(self) -> list[Request]:
        """Requests to hand to the engine now (called holding the lock)."""
        if self.batching:
            taken = list(self._inbox)
            self._inbox.clear()
            return taken
        if self.engine.busy or not self._inbox:
            return []
        return [self._inbox.popleft()]

    def _add(self, request: Request, owners: dict[Row, Request]) -> None:
        n = request.config.n
        for i, prompt in enumerate(request.prompts):
            for j in range(n):
                r = i * n + j
                row = self.engine.add(
                    prompt,
                    request.config,
                    seed=request.config.row_seed(r),
                    tag=r,
                    prompt_logprobs=request.prompt_logprobs,
                )
                if request.cancelled:
                    row.cancel()
                request.rows.append(row)
                owners[row] = request
        request.open = len(request.rows)

    def _deliver(self, events: list, owners: dict[Row, Request]) -> None:
        by_request: dict[Request, list] = {}
        for event in events:
            request = owners.get(event.row)  # type: ignore[arg-type]
            if request is None:
                continue
            by_request.setdefault(request, []).append(event)
            if isinstance(event, (FinishEvent, Failed)):
                del owners[event.row]  # type: ignore[arg-type]
                request.open -= 1
                if request.open == 0:
                    with self._cond:
                        self._requests.discard(request)
        for request, items in by_request.items():
            self._post(request, items)

    def _post(self, request: Request, items: list[Event | Failed]) -> None:
        try:
            request.loop.call_soon_threadsafe(_put_all, request.sink, items)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening
            request.cancel()


def _put_all(sink: asyncio.Queue, items: list) -> None:
    for item in items:
        sink.put_nowait(item)
