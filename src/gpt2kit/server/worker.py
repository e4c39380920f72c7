"""The server's side of the engine: one background thread owns the model and its `Engine`.

Requests come from the HTTP event loop (`submit`), join the engine's running batch at the
next step (continuous batching over its cache slots) and get their events back on their own
asyncio queue, one wake-up per event loop per step. Generation is exactly `complete`'s:
the same engine, sampler and row seeds (row r of a request samples with `seed + r`).
With `batching=False` the worker serves one request at a time (the baseline of
benchmarks/bench_serve.py).

The engine thread owns everything the engine touches. The event loop only sends it
messages under one lock: new requests, cancellations (`Request.cancel`), jobs (`call`:
the Explorer's forward passes, run between decode steps within `TimeShare`'s rule, on the
engine thread's own OpenMP team) and a new decode step (`use_step`: a compiled step built
while the server ran, swapped in between two engine steps; rows in flight go on with it). A request's rows and its cancelled flag are read and
written on the engine thread alone, so a cancel can't miss a row added beside it.

If the engine thread fails (anything raised outside one request's `Engine.add` or one
job), every request in flight gets `Failed`, every waiting job the error, and from then on
`failure` says why and `submit` / `call` raise `WorkerUnavailable` at once: the server
answers 503 and `/health` turns 503. A failed step leaves the cache and the rows in an
unknown state, so the engine is not rebuilt; a supervisor restarts the process
(`gpt2kit serve --exit-on-engine-failure`).

>>> worker = Worker(model, eos_token_id=50256)  # doctest: +SKIP
>>> request = worker.submit([[15496]], SamplingConfig(max_new_tokens=8, seed=0), sink=queue)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gpt2kit.faults import pause_point
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import DecodeStep, Engine, Event, FinishEvent, Row
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.openmp import release_thread_pool
from gpt2kit.server.timeshare import TimeShare

log = logging.getLogger(__name__)

T = TypeVar("T")

EXPLORER_SHARE = 1 / 16  # of a busy engine thread's time (server/timeshare.py)


class WorkerBusy(Exception):
    """The worker already holds as many requests (or jobs) as it may; the caller should answer 429."""


class WorkerUnavailable(Exception):
    """The engine thread failed or the server is stopping; the caller should answer 503."""


@dataclass(frozen=True)
class Failed:
    """Row `row` (None: every row of the request) can't finish: the engine failed (the server
    answers 500) or the server is shutting down."""

    row: Row | None
    message: str


@dataclass(eq=False)
class Request:
    """One request's rows (prompt i's sample j is row i * n + j) and where their events go.

    `rows`, `open` and `cancelled` belong to the engine thread; the event loop calls `cancel`.
    """

    prompts: list[list[int]]
    config: SamplingConfig
    prompt_logprobs: bool
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    worker: Worker
    rows: list[Row] = field(default_factory=list)
    open: int = 0  # rows not finished yet
    cancelled: bool = False

    def cancel(self, row: Row | None = None) -> None:
        """Stop `row` (None: every row) at the engine's next step: a stop string was reached,
        the client left, or all choices are done. Safe from any thread."""
        self.worker._send_cancel(self, row)


@dataclass(eq=False)
class _Job:
    fn: Callable[[], Any]
    future: Future


class Worker:
    """Runs the engine in a background thread (see the module docstring).

    `slots` is the engine's cache slots (rows decoded together), `max_pending` the requests
    held (running and waiting) before `submit` raises WorkerBusy, `step` the decode step.
    `max_jobs` bounds the jobs waiting for the engine thread (`call` raises WorkerBusy
    beyond) and `explorer_share` their share of the thread while rows decode.
    `on_failure(reason)` is called on the engine thread once it has failed.
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
        max_jobs: int = 16,
        explorer_share: float = EXPLORER_SHARE,
        on_failure: Callable[[str], None] | None = None,
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
        self.max_jobs = max_jobs
        self.share = TimeShare(share=explorer_share)
        self._on_failure = on_failure
        self.engine = self._new_engine()
        self._cond = threading.Condition()
        self._inbox: deque[Request] = deque()  # submitted, not yet handed to the engine
        self._cancels: deque[tuple[Request, Row | None]] = deque()  # for the engine thread
        self._jobs: deque[_Job] = deque()  # waiting for the engine thread
        self._swaps: deque[tuple[DecodeStep, Future]] = deque()  # new decode steps, likewise
        self._requests: set[Request] = set()  # submitted and not finished
        self._stopped = False
        self._failure: str | None = None
        # Loading the model and allocating the cache gave this thread OpenMP workers; with
        # the engine thread's own, the process would hold more than its cores and every
        # step would pay for parked workers (gpt2kit.openmp).
        release_thread_pool()
        self._thread = threading.Thread(target=self._run, name="gpt2kit-engine", daemon=True)
        self._thread.start()

    def _new_engine(self) -> Engine:
        return Engine(
            self.model,
            slots=self.slots,
            eos_token_id=self.eos,
            step=self._step,
            deterministic=self.deterministic,
            packed=True,  # the server's engine lives long: its prefill is faster, the same bits
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
            [list(p) for p in prompts], config, prompt_logprobs, asyncio.get_running_loop(), sink, self
        )
        with self._cond:
            self._check_available()
            if len(self._requests) >= self.max_pending:
                raise WorkerBusy(f"{self.max_pending} requests are already queued or running")
            self._requests.add(request)
            self._inbox.append(request)
            self._cond.notify()
        return request

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn()` on the engine thread between decode steps (the Explorer's forward passes);
        its result or exception arrives in the returned future (`asyncio.wrap_future` awaits it)."""
        job = _Job(fn, Future())
        with self._cond:
            self._check_available()
            if len(self._jobs) >= self.max_jobs:
                raise WorkerBusy(f"{self.max_jobs} Explorer requests are already waiting")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def use_step(self, step: DecodeStep) -> Future[int]:
        """Decode with `step` from the engine's next step on, without stopping: requests in
        flight go on with it. The future gets the number of rows that were running at the
        swap, or the ConfigError of a step that can't run on the engine's cache (`Engine.use_step`)."""
        future: Future[int] = Future()
        with self._cond:
            self._check_available()
            self._swaps.append((step, future))
            self._cond.notify()
        return future

    def _check_available(self) -> None:
        """Raise WorkerUnavailable if the engine thread can't take work (called holding the lock)."""
        if self._failure is not None:
            raise WorkerUnavailable(self._failure)
        if self._stopped:
            raise WorkerUnavailable("the server is shutting down")
        if not self._thread.is_alive():  # cannot happen while _run catches everything
            raise WorkerUnavailable("the engine thread has exited")

    def _send_cancel(self, request: Request, row: Row | None) -> None:
        with self._cond:
            if self._failure is not None or self._stopped:
                return  # the thread has ended (or is ending) every request already
            self._cancels.append((request, row))
            self._cond.notify()

    @property
    def load(self) -> int:
        """Requests queued or running (what `max_pending` caps)."""
        with self._cond:
            return len(self._requests)

    @property
    def jobs_waiting(self) -> int:
        """Jobs queued for the engine thread (what `max_jobs` caps)."""
        with self._cond:
            return len(self._jobs)

    @property
    def failure(self) -> str | None:
        """Why the engine thread can't serve (None while it can)."""
        with self._cond:
            if self._failure is None and not self._stopped and not self._thread.is_alive():
                return "the engine thread has exited"
            return self._failure

    def stop(self) -> None:
        """End the thread; rows still queued or running end as 'cancelled'."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # --- the engine thread --------------------------------------------------------------

    def _run(self) -> None:
        owners: dict[Row, Request] = {}
        try:
            self._loop(owners)
        except BaseException as e:  # whatever it was, the clients must hear of it
            log.exception("the engine thread failed")
            self._fail(f"the engine failed: {type(e).__name__}: {e}", owners)
            return
        self._end(owners, "the server is shutting down", WorkerUnavailable("the server is shutting down"))

    def _loop(self, owners: dict[Row, Request]) -> None:
        while True:
            with self._cond:
                while not (
                    self._stopped
                    or self._inbox
                    or self._cancels
                    or self._jobs
                    or self._swaps
                    or self.engine.busy
                ):
                    self._cond.wait()
                if self._stopped:
                    return
                swaps = list(self._swaps)
                self._swaps.clear()
                admitted = self._take()
                cancels = list(self._cancels)
                self._cancels.clear()
                busy = self.engine.busy or bool(admitted)
                job = self._jobs.popleft() if self._jobs and self.share.may_run(busy=busy) else None
            for step, future in swaps:
                self._swap(step, future)
            for request in admitted:
                self._add(request, owners)
            for request, row in cancels:
                self._cancel(request, row)
            if job is not None:
                self._run_job(job, busy=self.engine.busy)
            if self.engine.busy:
                pause_point("serve.engine_step")
                t0 = time.perf_counter()
                # Each token goes out as soon as it is chosen: a new row's first one right
                # after its own prefill, not after the whole round (time to first token).
                self.engine.step(emit=lambda events: self._deliver(events, owners))
                self.share.ran_step(time.perf_counter() - t0)
            else:
                self.share.idle()

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
        """Hand a request's rows to the engine; a request the engine refuses fails alone
        (`Engine.add` checks before it changes anything)."""
        n = request.config.n
        try:
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
                    request.rows.append(row)
                    owners[row] = request
        except Exception as e:
            log.warning("request refused by the engine: %s", e)
            for row in request.rows:
                row.cancel()
                del owners[row]
            with self._cond:
                self._requests.discard(request)
            self._post(request, [Failed(None, f"{type(e).__name__}: {e}")])
            return
        request.open = len(request.rows)
        if request.cancelled:
            self._cancel(request, None)

    def _swap(self, step: DecodeStep, future: Future) -> None:
        try:
            self.engine.use_step(step)
        except Exception as e:  # a step that doesn't fit: the engine goes on with its own
            future.set_exception(e)
            return
        self._step = step
        future.set_result(len(self.engine.rows))

    def _cancel(self, request: Request, row: Row | None) -> None:
        if row is not None:
            row.cancel()
            return
        request.cancelled = True
        for r in request.rows:
            r.cancel()

    def _run_job(self, job: _Job, *, busy: bool) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # its caller left
        t0 = time.perf_counter()
        try:
            result = job.fn()
        except Exception as e:  # the job's own failure: its caller answers it, the engine is untouched
            job.future.set_exception(e)
        else:
            job.future.set_result(result)
        self.share.ran_job(time.perf_counter() - t0, busy=busy)

    def _deliver(self, events: list, owners: dict[Row, Request]) -> None:
        by_request: dict[Request, list] = {}
        for event in events:
            request = owners.get(event.row)  # type: ignore[arg-type]
            if request is None:
                continue
            by_request.setdefault(request, []).append(event)
            if isinstance(event, FinishEvent):
                del owners[event.row]
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
            self._cancel(request, None)

    # --- the end --------------------------------------------------------------------------

    def _fail(self, reason: str, owners: dict[Row, Request]) -> None:
        """The engine thread can't go on: say why from now on, and tell everyone waiting."""
        with self._cond:
            self._failure = reason
        self._end(owners, reason, WorkerUnavailable(reason))
        if self._on_failure is not None:
            try:
                self._on_failure(reason)
            except Exception:
                log.exception("the engine-failure callback failed")

    def _end(self, owners: dict[Row, Request], message: str, error: Exception) -> None:
        """Fail every request and job still held (the thread is ending)."""
        with self._cond:
            leftover = set(owners.values()) | self._requests
            jobs = list(self._jobs)
            swaps = list(self._swaps)
            self._swaps.clear()
            self._inbox.clear()
            self._cancels.clear()
            self._jobs.clear()
            self._requests.clear()
        for request in leftover:
            self._post(request, [Failed(None, message)])
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
        for _, future in swaps:
            future.set_exception(error)


def _put_all(sink: asyncio.Queue, items: list) -> None:
    for item in items:
        sink.put_nowait(item)
