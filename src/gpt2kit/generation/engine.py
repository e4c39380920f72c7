"""The one decoding engine: continuous batching over a fixed number of KV-cache slots.

Every caller generates through it: `generate`, `complete` (and its streaming), the CLI, the
eval generation tasks and `gpt2kit serve`; beam search uses its cache and step.

- The cache is allocated once: per layer, keys and values of shape (slots, nh, max_len, hs).
  A row (one prompt, one sample) owns one slot. Rows are kept packed in slots 0..n-1: a row
  that leaves is replaced by the last one (one slot copy), so no tensor ever changes shape.
- Every row is at its own position. A row that joins is prefilled into its slot from
  position 0 (`GPT2.prefill`), on its own, then each step feeds one token per row at that
  row's own position (`GPT2.decode_step`, or its compiled version: `gpt2kit.model.compiled`).
- Each row samples with its own `SamplingConfig` and its own generator: one uniform number per
  step, so a row's tokens depend only on its seed, never on the rows beside it.

Which rows run beside a row can change its logits in the last bits, and a sampled token with
them (a neighbouring token sits just past the drawn uniform number): CPU kernels pick their
blocking, vector tails and thread split from the shapes they are called with, and a GEMM
with M = 1 row sums in another order than one with M = 8. Two measures make a row's tokens
depend only on its prompt, its config and its seed, bit for bit (docs/generation.md):
- always: each prompt is prefilled at its own length (no padding to a batch's longest
  prompt), so its kernels see shapes that depend on that prompt only. A long-lived engine
  (`packed=True`, the server's) prefills the prompts admitted in one step together, as one
  unpadded sequence, where it checked at start that the matrix products then give each
  prompt the same bits as alone (`prefill_together_is_exact`); attention still runs per
  prompt at its own length;
- with `deterministic=True`: every decode call has the same shape, `DECODE_ROWS` rows
  (free slots run a dummy row; more rows run as several calls), and attention is computed
  by kernels whose result for a row depends neither on its slot nor on the attended span
  (`ExactEagerStep`; a compiled step writes attention out already). It costs speed
  (benchmarks/README.md, "Deterministic decoding"), so it is an option.

`step()` runs one round (admit waiting rows into free slots, choose one token for every row,
run the model for the rows still going) and returns what happened as events.

>>> engine = Engine(model, slots=4, eos_token_id=50256)  # doctest: +SKIP
>>> row = engine.add([15496, 995], SamplingConfig(max_new_tokens=8, seed=0))  # doctest: +SKIP
>>> while engine.busy: events = engine.step()  # doctest: +SKIP
>>> row.tokens  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt2kit.errors import ConfigError
from gpt2kit.generation.config import SamplingConfig, row_generator, uniforms
from gpt2kit.generation.processors import History, next_tokens
from gpt2kit.model.compiled import decode_step
from gpt2kit.model.gpt2 import GPT2, use_decode_layout
from gpt2kit.model.packed import PackedWeights

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]

# Eager steps attend over the positions in use, rounded up to this: fewer cache reads than
# the whole max_len when rows are short, and few distinct shapes.
LENGTH_BUCKET = 64
# Rows in every decode call with `deterministic=True`: one fixed shape for every kernel,
# whatever the number of running rows (the server's default slots, and the batch the
# compiled steps are tuned for).
DECODE_ROWS = 8
# The prompt tokens prefilled in one pass at most, where prompts are prefilled together: a
# pass holds up the running rows' next token for its whole length (gpt2 124M bfloat16 on 2
# cores: 8 prompts of 13 tokens 60 ms together against 124 ms one by one, benchmarks/README.md
# "Prefill together"), and a longer pass gains nothing once its matrix products are big.
PREFILL_TOKENS = 256


class DecodeStep(Protocol):
    """One token per row at its own position (see `GPT2.decode_step`), eager or compiled."""

    slots: int | None  # the most rows one call takes (None: any)
    max_len: int | None  # the cache length it needs (None: any)

    def batch_size(self, n: int) -> int: ...

    def __call__(
        self, idx: Tensor, input_pos: Tensor, k_cache: list[Tensor], v_cache: list[Tensor]
    ) -> Tensor: ...


class EagerStep:
    """`GPT2.decode_step` as it is: any batch, any cache length."""

    slots = None
    max_len = None

    def __init__(self, model: GPT2) -> None:
        self.model = model

    def batch_size(self, n: int) -> int:
        return n

    def __call__(
        self, idx: Tensor, input_pos: Tensor, k_cache: list[Tensor], v_cache: list[Tensor]
    ) -> Tensor:
        return self.model.decode_step(idx, input_pos, k_cache, v_cache)


class ExactEagerStep(EagerStep):
    """`GPT2.decode_step` with attention from ATen's plain ops (SDPA's math backend).

    The fused CPU attention kernel gives a row results that depend on which of its threads
    ran it, so on the row's slot and the batch size (float32, 2 threads: ~1e-7); the plain
    matmul + softmax ones give a row the same bits in any slot and over any attended span
    past its position (tests/generation/test_determinism.py). Slower (see benchmarks/README.md)."""

    def __call__(
        self, idx: Tensor, input_pos: Tensor, k_cache: list[Tensor], v_cache: list[Tensor]
    ) -> Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return self.model.decode_step(idx, input_pos, k_cache, v_cache)


class SlotCache:
    """The KV cache of `slots` rows of `max_len` positions, and the model run on it.

    Per layer, keys and values (slots, nh, max_len, hs), allocated once in the model's dtype.
    `prefill` writes prompts into a range of slots from position 0; `decode` feeds one
    token per row at each row's own position; `copy` and `reorder` move rows between slots.
    With `deterministic`, every decode call runs `DECODE_ROWS` rows (the cache holds a
    multiple of that many slots) and the eager step is `ExactEagerStep`.
    """

    def __init__(
        self,
        model: GPT2,
        *,
        slots: int,
        max_len: int,
        step: DecodeStep | None = None,
        deterministic: bool = False,
    ) -> None:
        config = model.config
        self.model = model
        self.device = model.wte.weight.device
        self.deterministic = deterministic
        eager = ExactEagerStep(model) if deterministic else EagerStep(model)
        self.step: DecodeStep = step if step is not None else eager
        if self.step.max_len is not None:
            max_len = self.step.max_len
        # Rows per decode call: any number up to `slots`, or always DECODE_ROWS.
        self.call_rows = DECODE_ROWS if deterministic else slots
        if self.step.slots is not None and self.step.slots < self.call_rows:
            raise ConfigError(
                f"the decode step takes at most {self.step.slots} rows, not {self.call_rows}"
                + (" (deterministic decoding calls it with DECODE_ROWS rows)" if deterministic else "")
            )
        self.slots = slots
        self.max_len = max_len
        dtype = model.wte.weight.dtype
        allocated = -(-slots // self.call_rows) * self.call_rows  # room for the dummy rows
        shape = (allocated, config.n_head, max_len, config.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.n_layer)]
        self.together = False  # prefill several prompts in one pass (see `prefill`)

    def prefill(self, first: int, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Write `prompts` into slots first, first + 1, ...; returns (hidden states (b, T, C)
        right-padded with zeros, next-token logits (b, V) at each prompt's last token).

        Each prompt runs on its own, batch 1 at its own length: padded to a batch's longest
        prompt, a row's GEMMs and attention would have shapes (and so blocking and summation
        orders) that depend on the prompts beside it, and its logits would differ in the
        last bits (issue 19: a sampled token flipped on an AMX CPU). With `together` (set by
        the engine once `prefill_together_is_exact` passed), the prompts run as one sequence
        of all their tokens, unpadded (`GPT2.prefill(..., lengths)`): each still attends to
        itself alone at its own length, and only the matrix products, checked to give a row
        the same bits in any batch, see them together."""
        b, T = len(prompts), max(len(p) for p in prompts)
        if self.together and b > 1:
            lengths = [len(p) for p in prompts]
            ids = torch.tensor([[t for p in prompts for t in p]], dtype=torch.long, device=self.device)
            k = [t[first : first + b] for t in self.k]
            v = [t[first : first + b] for t in self.v]
            flat = self.model.prefill(ids, k, v, lengths)[0]  # (sum(lengths), C)
            ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
            states = list(flat.split(lengths))
            logits = self.model.logits(flat[ends])  # (b, V)
        else:
            states, logits = self._prefill_each(first, prompts)
        h = states[0].new_zeros(b, T, states[0].shape[-1])
        for i, state in enumerate(states):
            h[i, : state.shape[0]] = state
        return h, logits

    def _prefill_each(self, first: int, prompts: Sequence[Sequence[int]]) -> tuple[list[Tensor], Tensor]:
        states, logits = [], []
        for i, p in enumerate(prompts):
            ids = torch.tensor([list(p)], dtype=torch.long, device=self.device)  # (1, t)
            k = [t[first + i : first + i + 1] for t in self.k]
            v = [t[first + i : first + i + 1] for t in self.v]
            h = self.model.prefill(ids, k, v)  # (1, t, C)
            states.append(h[0])
            logits.append(self.model.logits(h[:, -1]))  # (1, V)
        return states, torch.cat(logits)

    def decode(self, tokens: Sequence[int] | Tensor, positions: Sequence[int]) -> Tensor:
        """Logits (n, V) after feeding row i (slot i) `tokens[i]` at `positions[i]`."""
        n = len(positions)
        if self.deterministic:
            b = -(-n // self.call_rows) * self.call_rows
        else:
            b = self.step.batch_size(n)
        assert n <= b <= self.k[0].shape[0], f"batch {b} for {n} rows and {self.slots} slots"
        pad = b - n
        idx = torch.as_tensor(tokens, device=self.device).reshape(n)
        if pad:  # dummy rows: token 0 at position 0 of a free slot, their logits dropped
            idx = torch.cat([idx, idx.new_zeros(pad)])
        input_pos = torch.tensor(list(positions) + [0] * pad, device=self.device)  # (b,)
        L = self.max_len
        if self.step.max_len is None:  # attend over the positions in use only
            L = min(self.max_len, -(-(max(positions) + 1) // LENGTH_BUCKET) * LENGTH_BUCKET)
        rows = b if not self.deterministic else self.call_rows
        out = []
        for s in range(0, b, rows):  # one call, or DECODE_ROWS rows a call when deterministic
            k = [t[s : s + rows, :, :L] for t in self.k]
            v = [t[s : s + rows, :, :L] for t in self.v]
            out.append(self.step(idx[s : s + rows, None], input_pos[s : s + rows], k, v))
        return (out[0] if len(out) == 1 else torch.cat(out))[:n]

    def copy(self, src: int, dst: int, length: int) -> None:
        """Slot `dst` takes the first `length` positions of slot `src`."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]

    def reorder(self, index: Tensor) -> None:
        """Slot i takes slot index[i]'s contents, for i < len(index) (beams following their parents)."""
        n = index.shape[0]
        for t in self.k + self.v:
            t[:n] = t.index_select(0, index)


@dataclass(eq=False)
class Row:
    """One sample of one prompt. `tokens` are its new tokens so far (an ending eos included)."""

    prompt: list[int]
    config: SamplingConfig
    generator: torch.Generator
    limit: int  # new tokens it may produce: max_new_tokens, cut to the cache
    tag: object = None  # the caller's handle
    prompt_logprobs: bool = False
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    slot: int | None = None

    def cancel(self) -> None:
        """Stop this row at the next step (a stop string was reached, the client left)."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class TokenEvent:
    """A row's new token; with `config.logprobs=k`, its log-probability and the k most likely
    tokens [(id, logprob)] under the model's own distribution (before penalties and filters)."""

    row: Row
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class PromptEvent:
    """The prompt's log-probabilities (asked with `prompt_logprobs`); the first is None."""

    row: Row
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass(frozen=True)
class FinishEvent:
    """The row ended: "stop" (eos), "length" (its limit) or "cancelled"."""

    row: Row
    reason: FinishReason


Event = TokenEvent | PromptEvent | FinishEvent


class Engine:
    """Decodes rows together over `slots` cache slots of `max_len` positions (see the module docstring).

    `max_len` defaults to the model's context; `eos_token_id` ends a row (None or -1: never).
    `step` is the decode step to run (an `EagerStep` by default; `gpt2kit.model.compiled` builds
    compiled ones). On CPU the model's weights get the decode layout (`use_decode_layout`).
    `deterministic`: decode at one fixed shape, so that a row's tokens are the same bits
    whatever rows run beside it and in whichever slot (see the module docstring); a compiled
    `step` must then take `DECODE_ROWS` rows.
    `packed`: run the model's eager products on weights packed once for oneDNN
    (`gpt2kit.model.packed`: the same bits, a faster prefill, a second copy of the weights
    and a reorder first); for an engine that lives long, like the server's.
    """

    def __init__(
        self,
        model: GPT2,
        *,
        slots: int,
        max_len: int | None = None,
        eos_token_id: int | None = None,
        step: DecodeStep | None = None,
        deterministic: bool = False,
        packed: bool = False,
    ) -> None:
        if not isinstance(slots, int) or slots < 1:
            raise ConfigError(f"slots must be an integer >= 1, got {slots!r}")
        config = model.config
        self.model = model
        self.device = model.wte.weight.device
        if self.device.type == "cpu":
            use_decode_layout(model)  # faster matrix-vector products on CPU (benchmarks/README.md)
        self.packed: PackedWeights | None = None
        if packed:
            self.packed, decision = PackedWeights.of(model)
            log.info("prefill: %s", decision)
        max_len = min(max_len or config.n_positions, config.n_positions)
        self.cache = SlotCache(model, slots=slots, max_len=max_len, step=step, deterministic=deterministic)
        self.deterministic = deterministic
        self.slots = slots
        self.max_len = self.cache.max_len
        self.eos = -1 if eos_token_id is None else eos_token_id
        self.vocab_size = config.vocab_size
        self.rows: list[Row] = []  # the running rows; rows[i] is in slot i
        self.waiting: deque[Row] = deque()
        self.logits: Tensor | None = None  # (len(rows), V): each running row's next-token logits
        self.seen: Tensor | None = None  # (slots, V) bool, allocated when a row needs it
        self.counts: Tensor | None = None  # (slots, V) float32, likewise
        if self.packed is not None and not deterministic and slots > 1:
            with self.packed.active(), torch.inference_mode():
                self.cache.together = prefill_together_is_exact(self.cache)
            log.info(
                "prefill: %s",
                "prompts admitted in the same step are prefilled together (checked: the same bits as alone)"
                if self.cache.together
                else "each prompt alone (prefilled together, a prompt got other bits on this CPU)",
            )

    # --- the caller's side --------------------------------------------------------------

    def add(
        self,
        prompt: Sequence[int],
        config: SamplingConfig,
        *,
        seed: int | None = None,
        tag: object = None,
        prompt_logprobs: bool = False,
    ) -> Row:
        """Queue one row: `prompt` (token ids, not empty) sampled with `config` and `seed`
        (the row's own: a request's row r uses `config.row_seed(r)`). It joins at the next step."""
        prompt = list(prompt)
        check_row(prompt, config, vocab_size=self.vocab_size, max_len=self.max_len)
        limit = min(config.max_new_tokens, self.max_len - len(prompt))
        row = Row(prompt, config, row_generator(seed, self.device), limit, tag, prompt_logprobs)
        self.waiting.append(row)
        return row

    def use_step(self, step: DecodeStep) -> None:
        """Decode with `step` from the next round on; the cache and the rows stay as they are.

        For a compiled step that finished building while rows ran (`gpt2kit serve`): every
        step writes and reads the same cache, so a row goes on where it was. ConfigError,
        with nothing changed, if `step` can't run on this cache: it takes fewer rows than a
        call has, or needs another cache length."""
        cache = self.cache
        if step.slots is not None and step.slots < cache.call_rows:
            raise ConfigError(
                f"the new decode step takes at most {step.slots} rows; this engine calls it with {cache.call_rows}"
            )
        if step.max_len is not None and step.max_len != cache.max_len:
            raise ConfigError(
                f"the new decode step needs a cache of {step.max_len} positions; this engine's holds {cache.max_len}"
            )
        cache.step = step

    @property
    def busy(self) -> bool:
        """Rows are running or waiting."""
        return bool(self.rows or self.waiting)

    def events(self) -> Iterator[Event]:
        """Run steps until every row has finished, yielding their events."""
        while self.busy:
            yield from self.step()

    # --- one round ----------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, emit: Callable[[list[Event]], None] | None = None) -> list[Event]:
        """Pick one token for every running row, admit waiting rows into the free slots (each
        prefilled, then given its first token), then run the model on all of them.

        Events are returned at the end or, with `emit`, handed to it as soon as they exist
        (and not returned): the running rows' tokens before any prefill starts, and each new
        row's first token right after its prefill (its own, or its group's where prompts are
        prefilled together), not after the whole round. That is the server's time to first
        token: no client waits for the decode that follows. The tokens are the same either way.
        """
        with self.packed.active() if self.packed is not None else contextlib.nullcontext():
            return self._step(emit)

    def _step(self, emit: Callable[[list[Event]], None] | None) -> list[Event]:
        events: list[Event] = []
        self._drop_cancelled(events)
        if self.rows:
            self._choose(events, range(len(self.rows)))  # on the logits of the last decode
            self._release()  # rows that ended free their slots for the waiting ones
        if emit is not None and events:
            emit(events)
            events = []
        self._admit(events, emit)
        if self.rows:
            self._decode()
        return events

    def _drop_cancelled(self, events: list[Event]) -> None:
        for row in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(row)
            self._finish(row, "cancelled", events)
        for row in self.rows:
            if row.cancelled:
                self._finish(row, "cancelled", events)
        self._release()

    def _finish(self, row: Row, reason: FinishReason, events: list[Event]) -> None:
        if row.finish_reason is None:
            row.finish_reason = reason
            events.append(FinishEvent(row, reason))

    def _admit(self, events: list[Event], emit: Callable[[list[Event]], None] | None) -> None:
        """Move waiting rows into free slots: prefill them (`SlotCache.prefill`: one by one, or
        a group of up to PREFILL_TOKENS prompt tokens in one pass where that is exact) and
        choose their first tokens (handed to `emit` after each prefill, if given)."""
        while self.waiting and len(self.rows) < self.slots:
            group = self._next_group()
            i = len(self.rows)
            for j, row in enumerate(group):
                row.slot = i + j
            h, logits = self.cache.prefill(i, [row.prompt for row in group])
            for j, row in enumerate(group):
                if row.prompt_logprobs:
                    events.append(self._prompt_logprobs(row, h[j, : len(row.prompt)]))
            self._init_history(group)
            self.rows.extend(group)
            self.logits = logits if self.logits is None else torch.cat([self.logits[:i], logits])
            for row in group:
                if row.limit == 0:  # scoring only (echo with max_tokens 0): nothing to generate
                    self._finish(row, "length", events)
            generating = [i + j for j, row in enumerate(group) if row.limit != 0]
            if generating:
                self._choose(events, generating)
            if any(row.finished for row in group):  # their slots are free again at once
                self._release()
            if emit is not None and events:
                emit(events)
                events.clear()

    def _next_group(self) -> list[Row]:
        """The waiting rows to prefill in one pass: the first, and while prefilling together
        is exact, those after it that fit the free slots and PREFILL_TOKENS."""
        group = [self.waiting.popleft()]
        if not self.cache.together:
            return group
        tokens = len(group[0].prompt)
        while (
            self.waiting
            and len(self.rows) + len(group) < self.slots
            and tokens + len(self.waiting[0].prompt) <= PREFILL_TOKENS
        ):
            tokens += len(self.waiting[0].prompt)
            group.append(self.waiting.popleft())
        return group

    def _prompt_logprobs(self, row: Row, h: Tensor) -> PromptEvent:
        logprobs = self.model.logits(h).float().log_softmax(dim=-1)  # (T, V)
        k = row.config.logprobs or 0
        chosen = torch.tensor(row.prompt[1:], device=self.device)
        values = logprobs[:-1].gather(1, chosen[:, None])[:, 0].tolist()
        tops: list[list[tuple[int, float]] | None] = [None]
        if k:
            top = logprobs[:-1].topk(k, dim=-1)
            tops += [
                list(zip(i, v, strict=True))
                for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
            ]
        else:
            tops += [[] for _ in values]
        return PromptEvent(row, [None, *values], tops)

    def _init_history(self, group: list[Row]) -> None:
        V = self.vocab_size
        if any(r.config.needs_seen for r in group) and self.seen is None:
            self.seen = torch.zeros(self.slots, V, dtype=torch.bool, device=self.device)
        if any(r.config.needs_counts for r in group) and self.counts is None:
            self.counts = torch.zeros(self.slots, V, dtype=torch.float32, device=self.device)
        for row in group:
            if self.seen is not None:
                self.seen[row.slot] = False
                self.seen[row.slot, torch.tensor(row.prompt, device=self.device)] = True
            if self.counts is not None:
                self.counts[row.slot] = 0

    def _choose(self, events: list[Event], which: Sequence[int]) -> None:
        """One token for each running row in `which` (indices into `rows`), each with its own
        config and generator: a row's token never depends on which rows are chosen with it."""
        assert self.logits is not None and self.logits.shape[0] == len(self.rows)
        which = list(which)
        rows = [self.rows[i] for i in which]
        index = torch.tensor(which, device=self.device)  # the rows' slots
        raw = self.logits if len(which) == len(self.rows) else self.logits[index]
        u = uniforms([r.generator for r in rows], self.device)  # (n,): one draw per row per step
        groups: dict[tuple, list[int]] = {}
        for j, row in enumerate(rows):
            groups.setdefault(row.config.scoring, []).append(j)
        logits = self._without_early_eos(raw, rows)
        if len(groups) == 1:
            tokens = self._pick(which, logits, u)
        else:
            tokens = torch.empty(len(rows), dtype=torch.long, device=self.device)
            for members in groups.values():
                local = torch.tensor(members, device=self.device)
                tokens[local] = self._pick([which[j] for j in members], logits[local], u[local])
        wanted = [j for j, r in enumerate(rows) if r.config.logprobs is not None]
        logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        if wanted:
            logprobs = self._logprobs(rows, raw, wanted, tokens)
        if self.seen is not None:
            self.seen[index, tokens] = True
        if self.counts is not None:
            self.counts[index, tokens] += 1
        for j, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            row.tokens.append(token)
            lp, top = logprobs.get(j, (None, None))
            events.append(TokenEvent(row, token, lp, top))
            if token == self.eos and not row.config.ignore_eos:
                self._finish(row, "stop", events)
            elif len(row.tokens) >= row.limit:
                self._finish(row, "length", events)

    def _without_early_eos(self, logits: Tensor, rows: list[Row]) -> Tensor:
        """`logits` (one row each of `rows`) with the eos masked in rows that have fewer than
        `min_tokens` tokens (a copy: reported logprobs stay the model's own), so the eos is
        never drawn there."""
        early = [j for j, r in enumerate(rows) if len(r.tokens) < r.config.min_tokens]
        if not early or self.eos < 0:
            return logits
        logits = logits.clone()
        logits[torch.tensor(early, device=self.device), self.eos] = float("-inf")
        return logits

    def _pick(self, members: Sequence[int], logits: Tensor, u: Tensor) -> Tensor:
        rows = [self.rows[i] for i in members]
        config = rows[0].config
        index = torch.tensor(list(members), device=self.device) if len(rows) < len(self.rows) else None
        slots = index if index is not None else slice(0, len(rows))
        history = History(
            seen=self.seen[slots] if config.needs_seen and self.seen is not None else None,
            counts=self.counts[slots] if config.needs_counts and self.counts is not None else None,
            tokens=[r.prompt + r.tokens for r in rows] if config.no_repeat_ngram_size else None,
        )
        return next_tokens(logits, config, history, u)

    def _logprobs(
        self, rows: list[Row], raw: Tensor, wanted: list[int], tokens: Tensor
    ) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """For rows[j], j in `wanted`: the chosen token's logprob and the top `logprobs`, under
        the model's own distribution (`raw`, one row of logits each of `rows`)."""
        index = torch.tensor(wanted, device=self.device)
        lp = raw[index].float().log_softmax(dim=-1)  # (w, V)
        chosen = lp.gather(1, tokens[index][:, None])[:, 0].tolist()
        k = max(rows[j].config.logprobs or 0 for j in wanted)
        top_ids, top_values = ([], [])
        if k:
            top = lp.topk(k, dim=-1)
            top_ids, top_values = top.indices.tolist(), top.values.tolist()
        out = {}
        for w, j in enumerate(wanted):
            kk = rows[j].config.logprobs or 0
            pairs = list(zip(top_ids[w][:kk], top_values[w][:kk], strict=True)) if kk else []
            out[j] = (chosen[w], pairs)
        return out

    def _release(self) -> None:
        """Drop finished rows; the last rows move into the freed slots, so rows stay packed."""
        alive = [r for r in self.rows if not r.finished]
        if len(alive) == len(self.rows):
            return
        old = {row: row.slot for row in alive}  # rows[i] is in slot i
        m = len(alive)
        taken = {r.slot for r in alive}
        holes = [s for s in range(m) if s not in taken]
        movers = [r for r in alive if r.slot is not None and r.slot >= m]
        for hole, row in zip(holes, movers, strict=True):
            self._move(row, hole)
        alive.sort(key=lambda r: r.slot)  # type: ignore[arg-type, return-value]
        if self.logits is not None and m:
            self.logits = self.logits[torch.tensor([old[r] for r in alive], device=self.device)]
        else:
            self.logits = None
        self.rows = alive

    def _move(self, row: Row, slot: int) -> None:
        src = row.slot
        assert src is not None
        self.cache.copy(src, slot, len(row.prompt) + len(row.tokens))  # the positions it has written
        for table in (self.seen, self.counts):
            if table is not None:
                table[slot] = table[src]
        row.slot = slot

    def _decode(self) -> None:
        """Feed each running row its last token at its own position; keep the logits."""
        positions = [len(r.prompt) + len(r.tokens) - 1 for r in self.rows]
        self.logits = self.cache.decode([r.tokens[-1] for r in self.rows], positions)


def check_row(prompt: Sequence[int], config: SamplingConfig, *, vocab_size: int, max_len: int) -> None:
    """The rules a row must meet on a model (ConfigError; a SamplingError names the field):
    `Engine.add` applies them, and the server before it submits (to answer 400, not fail a step)."""
    if not prompt:
        raise ConfigError("a prompt needs at least one token; start an empty one from <|endoftext|>")
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ConfigError(
            f"token id {bad} is outside the model's vocabulary [0, {vocab_size}) (in the prompt)"
        )
    if len(prompt) > max_len:
        raise ConfigError(f"prompt has {len(prompt)} tokens; the cache holds {max_len}; shorten the prompt")
    config.check_vocab(vocab_size)


def prefill_together_is_exact(cache: SlotCache) -> bool:
    """Whether prompts prefilled together in `cache` get the same bits as each alone: their
    hidden states, logits and keys and values, for prompts of 1 to 33 tokens (and fewer
    where the cache is shorter). The matrix products are the only part that sees them
    together; whether a row's result depends on the rows beside it is up to the kernels
    (oneDNN's packed bfloat16 products: no, on the CPUs measured), so it is checked here, on
    this machine, before the engine relies on it. Uses the cache's first slots."""
    model = cache.model
    g = torch.Generator().manual_seed(0)
    lengths = [t for t in (1, 7, 16, 33, 5) if t <= cache.max_len][: cache.k[0].shape[0]]
    prompts = [torch.randint(0, model.config.vocab_size, (t,), generator=g).tolist() for t in lengths]
    results = []
    for together in (False, True):
        cache.together = together
        h, logits = cache.prefill(0, prompts)
        kv = [t[: len(prompts), :, : max(lengths)].clone() for t in (*cache.k, *cache.v)]
        results.append((h, logits, kv))
    cache.together = False
    (h0, l0, kv0), (h1, l1, kv1) = results
    return (
        len(prompts) > 1
        and torch.equal(h0, h1)
        and torch.equal(l0, l1)
        and all(torch.equal(a, b) for a, b in zip(kv0, kv1, strict=True))
    )


def step_for(
    model: GPT2,
    *,
    slots: int,
    max_len: int,
    compile: bool | None,
    progress: Callable[[str], None] | None = None,
    deterministic: bool = False,
) -> DecodeStep | None:
    """The decode step `compile` asks for, or None for the eager one. One meaning everywhere
    (`generate`, `complete`, `beam_search`, `gpt2kit generate`, `serve`, `eval`):

    - None (the default): the compiled step saved for this model, if there is one; else eager.
      Nothing is built behind the caller's back.
    - True: the same, building it first when none is saved (minutes, once per model, dtype
      and machine; `progress(message)` hears each phase).
    - False: eager.

    A compiled step is used only after it passes its check against the eager model. When
    one is wanted but can't be had (no C++ compiler, a failed build, a failed check), one
    warning says why and decoding is eager (`gpt2kit.model.compiled.decode_step`).

    With `deterministic`, the step takes `DECODE_ROWS` rows or more and has no one-row tier:
    a deterministic engine calls it with DECODE_ROWS rows every time.
    """
    if compile is False:
        return None
    if deterministic:
        slots = max(slots, DECODE_ROWS)
    return decode_step(
        model,
        slots=slots,
        max_len=max_len,
        build=compile is True,
        progress=progress,
        tiered=not deterministic,
    )
