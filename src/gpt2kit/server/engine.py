"""The decoding engine behind the server: continuous batching on one shared KV cache.

A background thread owns the model. Requests queue up as rows (one per choice); at every
step boundary the thread prefills the waiting rows together (left-padded, with an
attention mask) and merges them into the running batch, then decodes one token for every
row at once. Each row streams its tokens back to its caller through a queue; a row leaves
the batch when it ends or its caller cancels it, and the cache is repacked so the batch
never carries dead columns. With `batching=False` the engine serves one request at a time
(the baseline of benchmarks/bench_serve.py).

>>> engine = Engine(model, eos_token_id=50256)  # doctest: +SKIP
>>> row = engine.submit([15496], SamplingParams(max_tokens=8, seed=0))[0]  # doctest: +SKIP
>>> [e for e in row.events()]  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from gpt2kit.model import GPT2, KVCache
from gpt2kit.sampling import top_p_filter

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]


class EngineBusy(Exception):
    """The engine already holds as many requests as it may; the caller should answer 429."""


@dataclass(frozen=True)
class SamplingParams:
    """What one choice asks of the engine (the wire format maps onto this in protocol.py).

    `logprobs` is how many alternatives to report per token (None: no logprobs);
    `prompt_logprobs` asks for the prompt's own log-probabilities (echo + logprobs).
    Log-probabilities are always those of the model (before temperature and top-p).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, its log-probability and the top alternatives [(id, logprob)]."""

    token: int
    logprob: float | None  # None unless the row asked for logprobs
    top: list[tuple[int, float]] | None


@dataclass(frozen=True)
class PromptEvent:
    """The prompt's log-probabilities: the first is None (nothing predicts it)."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    message: str = ""


Event = TokenEvent | PromptEvent | FinishEvent


@dataclass(eq=False)
class Row:
    """One choice being generated: the caller reads its events and may cancel it."""

    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    request_id: int
    index: int = 0  # which of the request's n choices
    _queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _loop: asyncio.AbstractEventLoop | None = None
    _sink: asyncio.Queue | None = None  # receives (row, event) on the caller's event loop
    cancelled: bool = False
    finished: bool = False
    generated: int = 0

    def cancel(self) -> None:
        """Stop generating this row at the next step (a disconnected client, a stop string)."""
        self.cancelled = True

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Blocking iterator over this row's events, ending with its FinishEvent."""
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if isinstance(event, FinishEvent):
                return

    async def next_event(self) -> Event:
        """The next event, for callers that submitted from an event loop without a sink."""
        assert self._sink is not None, "submit() was not called from an event loop"
        _, event = await self._sink.get()
        return event


def _deliver(items: list[tuple[Row, Event]]) -> None:
    """Runs on the caller's event loop: hand a step's events to their queues."""
    for row, event in items:
        assert row._sink is not None
        row._sink.put_nowait((row, event))


@dataclass
class _Batch:
    """The running batch: rows, their shared cache and the logits that pick each row's next token."""

    rows: list[Row]
    cache: KVCache
    logits: Tensor  # (B, V)


class Engine:
    """Owns the model in one background thread and decodes all rows in shared batches.

    `max_batch_size` caps the rows decoded together, `max_pending` the requests held
    (running and waiting) before `submit` raises EngineBusy.
    """

    def __init__(
        self,
        model: GPT2,
        *,
        eos_token_id: int,
        batching: bool = True,
        max_batch_size: int = 32,
        max_pending: int = 64,
    ) -> None:
        self.model = model
        self.eos = eos_token_id
        self.batching = batching
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        self.n_ctx = model.config.n_positions
        self.device = model.wte.weight.device
        self._waiting: list[list[Row]] = []  # one list of rows per request, in arrival order
        self._open_rows: dict[int, int] = {}  # request id -> its rows not yet finished
        self._cond = threading.Condition()
        self._next_id = 0
        self._stopped = False
        self._outbox: list[tuple[Row, Event]] = []  # this step's events, delivered together
        self._thread = threading.Thread(target=self._loop, name="gpt2kit-engine", daemon=True)
        self._thread.start()

    # --- the caller's side --------------------------------------------------------------

    def submit(
        self, prompt: Sequence[int], params: SamplingParams, *, n: int = 1, sink: asyncio.Queue | None = None
    ) -> list[Row]:
        """Queue `n` choices of `prompt`; choice i samples with seed `params.seed + i`.

        Called from an event loop, events arrive as `(row, event)` in `sink` (one queue can
        serve many requests), or without a sink through `await row.next_event()`; called
        from a thread, iterate `row.events()`.
        """
        assert 0 < len(prompt) <= self.n_ctx, "the caller checks the prompt against the context"
        assert len(prompt) + params.max_tokens <= self.n_ctx, "the caller checks max_tokens"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        base = params.seed if params.seed is not None else secrets.randbits(63)
        with self._cond:
            if self._stopped:
                raise RuntimeError("engine is stopped")
            if len(self._open_rows) >= self.max_pending:
                raise EngineBusy(f"{self.max_pending} requests are already queued or running")
            request_id = self._next_id
            self._next_id += 1
            rows = []
            for i in range(n):
                gen = torch.Generator(device=self.device).manual_seed((base + i) % 2**64)
                row = Row(list(prompt), params, gen, request_id, index=i)
                if loop is not None:
                    row._loop, row._sink = loop, sink if sink is not None else asyncio.Queue()
                rows.append(row)
            self._open_rows[request_id] = n
            self._waiting.append(rows)
            self._cond.notify()
        return rows

    def stop(self) -> None:
        """Finish the background thread; rows still queued end with reason 'cancelled'."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    @property
    def load(self) -> int:
        """Requests queued or running (what `max_pending` caps)."""
        with self._cond:
            return len(self._open_rows)

    # --- the engine thread --------------------------------------------------------------

    def _loop(self) -> None:
        batch: _Batch | None = None
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and batch is None:
                    self._cond.wait()
                if self._stopped:
                    leftover = [r for rows in self._waiting for r in rows]
                    leftover += batch.rows if batch is not None else []
                    self._waiting.clear()
                    break
                admitted = self._admit(batch)
            try:
                with torch.inference_mode():
                    batch = self._step(batch, admitted)
            except Exception as e:  # keep serving: fail the rows of this batch, not the server
                log.exception("engine step failed")
                rows = (batch.rows if batch is not None else []) + admitted
                for row in rows:
                    self._finish(row, "error", f"{type(e).__name__}: {e}")
                batch = None
            self._flush()
        for row in leftover:
            self._finish(row, "cancelled", "server is shutting down")
        self._flush()

    def _emit(self, row: Row, event: Event) -> None:
        self._outbox.append((row, event))

    def _flush(self) -> None:
        """Deliver the step's events: one wake-up per caller event loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Row, Event]]] = {}
        for row, event in self._outbox:
            if row._loop is None:
                row._queue.put(event)
            else:
                by_loop.setdefault(row._loop, []).append((row, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's event loop is gone: nobody is listening
                for row, _ in items:
                    row.cancelled = True

    def _admit(self, batch: _Batch | None) -> list[Row]:
        """Take waiting requests that fit into the batch now (called holding the lock)."""
        running = batch.rows if batch is not None else []
        if running and not self.batching:
            return []
        admitted: list[Row] = []
        while self._waiting:
            rows = self._waiting[0]
            if running or admitted:
                if not self.batching:
                    break
                if len(running) + len(admitted) + len(rows) > self.max_batch_size:
                    break
            self._waiting.pop(0)
            admitted += rows
        return admitted

    def _step(self, batch: _Batch | None, admitted: list[Row]) -> _Batch | None:
        """Prefill newcomers, merge them in, sample one token per row, advance the cache."""
        admitted = [r for r in admitted if not self._drop_cancelled(r)]
        if admitted:
            batch = self._merge(batch, self._prefill(admitted))
        if batch is None:
            return None
        tokens = self._sample(batch)
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True)):
            if self._drop_cancelled(row):
                continue
            if token == self.eos:
                self._finish(row, "stop")
                continue
            self._emit(row, self._token_event(batch.logits[i], token, row.params.logprobs))
            row.generated += 1
            if row.generated >= row.params.max_tokens:
                self._finish(row, "length")
            else:
                keep.append(i)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            index = torch.tensor(keep, device=self.device)
            batch.cache.select_rows(index)
            batch.rows = [batch.rows[i] for i in keep]
            tokens = tokens.index_select(0, index)
        if batch.cache.pos + 1 > batch.cache.max_len:
            batch.cache = self._repack(batch.cache, room=1 + max(self._remaining(r) for r in batch.rows))
        batch.logits = self.model(tokens[:, None], kv_cache=batch.cache, last_only=True).logits[:, -1]
        return batch

    def _drop_cancelled(self, row: Row) -> bool:
        if row.cancelled:
            self._finish(row, "cancelled")
        return row.cancelled

    def _finish(self, row: Row, reason: FinishReason, message: str = "") -> None:
        """End a row exactly once; the request is done when its last row is."""
        if row.finished:
            return
        row.finished = True
        self._emit(row, FinishEvent(reason, message))
        with self._cond:
            self._open_rows[row.request_id] -= 1
            if self._open_rows[row.request_id] == 0:
                del self._open_rows[row.request_id]

    @staticmethod
    def _remaining(row: Row) -> int:
        return row.params.max_tokens - row.generated

    def _prefill(self, rows: list[Row]) -> _Batch | None:
        """Run the newcomers' prompts (left-padded) through the model, filling a fresh cache."""
        # Rows that want their prompt's log-probabilities need logits at every position:
        # run them alone so the (T, V) logits stay one row's worth.
        live: list[Row] = []
        for row in rows:
            if row.params.prompt_logprobs:
                self._prompt_logprobs(row)
            if row.params.max_tokens == 0:
                self._finish(row, "length")
            else:
                live.append(row)
        if not live:
            return None
        T = max(len(r.prompt) for r in live)
        ids = torch.zeros(len(live), T, dtype=torch.long)
        mask = torch.zeros(len(live), T, dtype=torch.bool)
        for i, row in enumerate(live):
            ids[i, T - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, T - len(row.prompt) :] = True
        room = max(self._remaining(r) for r in live)
        cache = KVCache.allocate(
            self.model.config,
            len(live),
            min(self.n_ctx, T + room),
            device=self.device,
            dtype=self.model.wte.weight.dtype,
        )
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits = self.model(ids, attention_mask=mask, kv_cache=cache, last_only=True).logits[:, -1]
        if cache.mask is None:  # no row was padded; the merge below wants an explicit mask
            cache.mask = torch.ones(len(live), cache.max_len, dtype=torch.bool, device=self.device)
        return _Batch(live, cache, logits)

    def _prompt_logprobs(self, row: Row) -> None:
        ids = torch.tensor([row.prompt], device=self.device)
        logprobs = self.model(ids).logits[0].float().log_softmax(dim=-1)  # (T, V)
        values: list[float | None] = [None]
        tops: list[list[tuple[int, float]] | None] = [None]
        for t in range(1, len(row.prompt)):
            values.append(float(logprobs[t - 1, row.prompt[t]]))
            tops.append(_top(logprobs[t - 1], row.params.logprobs or 0, row.prompt[t]))
        self._emit(row, PromptEvent(values, tops))

    def _merge(self, batch: _Batch | None, new: _Batch | None) -> _Batch | None:
        """One batch holding both: caches right-aligned so every row's next position is shared."""
        if batch is None or new is None:
            return batch if new is None else new
        rows = batch.rows + new.rows
        room = max(self._remaining(r) for r in rows)
        a = self._repack(batch.cache, room=0)
        b = self._repack(new.cache, room=0)
        P = max(a.pos, b.pos)
        cache = KVCache.allocate(
            self.model.config,
            len(rows),
            min(self.n_ctx, P + room),
            device=self.device,
            dtype=a.k[0].dtype,
        )
        cache.mask = torch.zeros(len(rows), cache.max_len, dtype=torch.bool, device=self.device)
        cache.mask[:, P:] = True
        cache.pos = P
        for src, lo, hi in ((a, 0, len(batch.rows)), (b, len(batch.rows), len(rows))):
            for dst_l, src_l in zip(cache.k + cache.v, src.k + src.v, strict=True):
                dst_l[lo:hi, :, P - src.pos : P] = src_l[:, :, : src.pos]
            assert src.mask is not None
            cache.mask[lo:hi, P - src.pos : P] = src.mask[:, : src.pos]
        return _Batch(rows, cache, torch.cat([batch.logits, new.logits]))

    def _repack(self, cache: KVCache, *, room: int) -> KVCache:
        """Drop leading columns no row uses and leave `room` free positions (a copy)."""
        assert cache.mask is not None
        used = cache.mask[:, : cache.pos].any(dim=0)
        first = int(used.nonzero()[0]) if bool(used.any()) else cache.pos
        width = cache.pos - first
        out = KVCache.allocate(
            self.model.config,
            cache.batch_size,
            max(1, min(self.n_ctx, width + room)),
            device=self.device,
            dtype=cache.k[0].dtype,
        )
        for dst, src in zip(out.k + out.v, cache.k + cache.v, strict=True):
            dst[:, :, :width] = src[:, :, first : cache.pos]
        out.mask = torch.ones(cache.batch_size, out.max_len, dtype=torch.bool, device=self.device)
        out.mask[:, :width] = cache.mask[:, first : cache.pos]
        out.pos = width
        return out

    def _sample(self, batch: _Batch) -> Tensor:
        """One token per row with the row's own temperature, top-p and generator (B,)."""
        return sample_rows(
            batch.logits,
            temperature=torch.tensor([r.params.temperature for r in batch.rows], device=self.device),
            top_p=torch.tensor([r.params.top_p for r in batch.rows], device=self.device),
            generators=[r.generator for r in batch.rows],
        )

    def _token_event(self, logits: Tensor, token: int, k: int | None) -> TokenEvent:
        if k is None:  # log-softmax over the vocabulary only for rows that asked for it
            return TokenEvent(token, None, None)
        logprobs = logits.float().log_softmax(dim=-1)
        return TokenEvent(token, float(logprobs[token]), _top(logprobs, k, token))


def sample_rows(
    logits: Tensor, *, temperature: Tensor, top_p: Tensor, generators: Sequence[torch.Generator]
) -> Tensor:
    """Next token per row (B,) from logits (B, V), each row with its own settings and generator.

    Temperature 0 is greedy. Each row draws exactly one uniform number per step, greedy
    or not, so its tokens never depend on which other rows share the batch. Inverse-CDF
    sampling (one draw per row) rather than gpt2kit.sampling's exponential race (one draw
    per vocabulary entry): at 50257 entries the race's draws cost as much as a small
    model's forward pass, and they grow with the batch.

    >>> sample_rows(torch.tensor([[0.0, 9.0]]), temperature=torch.tensor([0.0]),
    ...             top_p=torch.tensor([1.0]), generators=[torch.Generator()])
    tensor([1])
    """
    logits = logits.float()  # (B, V)
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    if bool((top_p < 1).any()):
        scaled = top_p_filter(scaled, top_p)
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])  # (B,)
    # The first token whose cumulative probability exceeds u (scaled by the total, so float
    # round-off in the cumsum can never push u past the end); zero-probability tokens
    # never qualify.
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    drawn = drawn.clamp(max=logits.shape[-1] - 1)
    if bool(greedy.any()):
        drawn = torch.where(greedy, logits.argmax(dim=-1), drawn)
    return drawn


def _top(logprobs: Tensor, k: int, chosen: int) -> list[tuple[int, float]]:
    """The k most likely tokens with their log-probabilities, plus the chosen one (OpenAI does too)."""
    out: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        out = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
    if all(i != chosen for i, _ in out):
        out.append((chosen, float(logprobs[chosen])))
    return out
