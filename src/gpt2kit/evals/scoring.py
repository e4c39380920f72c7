"""Log-likelihood of continuations given contexts, batched: the core of lambada and multiple-choice.

`score_choices` scores several continuations of one context each. The context runs once
(a batch of contexts fills the engine's KV cache, `generation.engine.SlotCache`), the cache
is copied to one slot per continuation, and the continuations run together on top of it
in one pass (`GPT2.extend`), each at its own position. So a multiple-choice item with 4 options costs one context pass,
not 4, and many items share each forward pass. Logits are computed only where a
continuation token is predicted, never for the context.

A sequence longer than the model's context keeps its last tokens, as lm-eval-harness
does: the context is cut from the left so that context + continuation - 1 tokens fit.

>>> scores = score_continuations(model, [([464, 3797], [373])])  # doctest: +SKIP
>>> scores[0].logprob, scores[0].greedy  # doctest: +SKIP
(-4.1, False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gpt2kit.errors import DataError
from gpt2kit.generation.engine import SlotCache
from gpt2kit.generation.prompts import eos_id
from gpt2kit.model.gpt2 import GPT2

# At most this many logits (rows x positions x vocab) exist at once: 2**25 floats, 128 MiB.
LOGITS_BUDGET = 1 << 25


@dataclass(frozen=True)
class ContinuationScore:
    """`logprob`: sum of log P(token | everything before it) over the continuation's tokens;
    `greedy`: the argmax at every continuation position is the continuation's token (so
    greedy decoding from the context produces exactly the continuation)."""

    logprob: float
    n_tokens: int
    greedy: bool


def check_fits(where: str, what: str, n_tokens: int, n_ctx: int) -> None:
    """Reject a continuation longer than the model's context, naming its file:line (`where`).

    `score_choices` can only name an item by its index; the evaluators know the task file,
    so they call this first and the user learns which line to fix.
    """
    if n_tokens > n_ctx:
        raise DataError(
            f"{where}: {what} is {n_tokens} tokens, longer than the model's context of {n_ctx}; "
            "shorten it or use a model with a longer context"
        )


def score_continuations(
    model: GPT2,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    bos_token_id: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ContinuationScore]:
    """Score each (context ids, continuation ids) pair; results are in the requests' order."""
    nested = score_choices(
        model,
        [ctx for ctx, _ in requests],
        [[cont] for _, cont in requests],
        batch_size=batch_size,
        bos_token_id=bos_token_id,
        progress=progress,
    )
    return [scores[0] for scores in nested]


@torch.inference_mode()
def score_choices(
    model: GPT2,
    contexts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    *,
    batch_size: int = 16,
    bos_token_id: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[ContinuationScore]]:
    """Score every continuation `choices[i][j]` of `contexts[i]`.

    `batch_size` bounds the continuations (rows) per forward pass (an item with more
    choices still runs whole, alone; logits memory stays bounded). An empty context is
    replaced by `bos_token_id` (None: <|endoftext|>, `generation.prompts.eos_id(model)`), so
    the first token still has a prediction.
    `progress(0)` is called once every request has passed its checks and scoring starts
    (a caller can open its progress bar then), and `progress(n)` as each batch of n
    contexts finishes.
    """
    if len(contexts) != len(choices):
        raise ValueError(f"{len(contexts)} contexts but {len(choices)} lists of choices")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_ctx = model.config.n_positions
    bos = eos_id(model) if bos_token_id is None else bos_token_id

    # Work units: (item, [choice indices], context ids). An item whose longest choice
    # doesn't fit next to its context is split into one unit per choice, each cut on its own.
    units: list[tuple[int, list[int], list[int]]] = []
    for i, (ctx, conts) in enumerate(zip(contexts, choices, strict=True)):
        ctx = list(ctx) or [bos]
        if not conts or any(len(c) == 0 for c in conts):
            raise ValueError(f"item {i} has no choices or an empty continuation")
        longest = max(len(c) for c in conts)
        if longest > n_ctx:
            raise DataError(
                f"item {i}: an answer of {longest} tokens exceeds the model's context of {n_ctx}; shorten it"
            )
        if len(ctx) + longest - 1 <= n_ctx:
            units.append((i, list(range(len(conts))), ctx))
        else:
            units += [(i, [j], ctx[max(0, len(ctx) - (n_ctx - len(c) + 1)) :]) for j, c in enumerate(conts)]

    if progress is not None:
        progress(0)
    # Longest contexts first: similar lengths share a batch, so little padding.
    order = sorted(range(len(units)), key=lambda u: -len(units[u][2]))
    results: list[list[ContinuationScore | None]] = [[None] * len(c) for c in choices]
    done_items: set[int] = set()
    batch: list[int] = []
    rows = width = 0
    for u in [*order, None]:
        n_rows = len(units[u][1]) if u is not None else 0
        # A batch's cache spans its longest context plus its longest continuation.
        longest = max((len(choices[units[u][0]][j]) for j in units[u][1]), default=0) if u is not None else 0
        too_wide = batch and len(units[batch[0]][2]) + max(width, longest) - 1 > n_ctx
        if batch and (u is None or rows + n_rows > batch_size or too_wide):
            conts = [[list(choices[units[b][0]][j]) for j in units[b][1]] for b in batch]
            scores = _score_batch(model, [units[b][2] for b in batch], conts)
            for b, unit_scores in zip(batch, scores, strict=True):
                i, js, _ = units[b]
                for j, s in zip(js, unit_scores, strict=True):
                    results[i][j] = s
            if progress is not None:
                finished = {units[b][0] for b in batch if all(s is not None for s in results[units[b][0]])}
                progress(len(finished - done_items))
                done_items |= finished
            batch, rows, width = [], 0, 0
        if u is not None:
            batch.append(u)
            rows += n_rows
            width = max(width, longest)
    return results  # type: ignore[return-value]


def _score_batch(
    model: GPT2, contexts: list[list[int]], conts: list[list[list[int]]]
) -> list[list[ContinuationScore]]:
    """One context pass for `contexts`, then every continuation on a copy of its context's cache.

    The engine's `SlotCache`: slots R.. hold the B contexts (prefilled together, right-padded;
    attention is causal, so padding is never seen), slots 0..R-1 get a copy of their context's
    slot, and all continuations run in one pass (`GPT2.extend`), each row at its own position.
    """
    B = len(contexts)
    row_item = [b for b, item in enumerate(conts) for _ in item]
    row_conts = [c for item in conts for c in item]
    R = len(row_conts)
    To = max(len(c) for c in row_conts) - 1  # the last token is predicted, never fed
    cache = SlotCache(model, slots=R + B, max_len=max(len(c) for c in contexts) + To)
    _, first = cache.prefill(R, contexts)  # (B, V): predicts every continuation's first token
    device = first.device
    cache.reorder(torch.tensor([R + b for b in row_item], device=device))  # slot r: its context

    targets = torch.zeros(R, To + 1, dtype=torch.long)
    lengths = torch.tensor([len(c) for c in row_conts])
    for r, c in enumerate(row_conts):
        targets[r, : len(c)] = torch.tensor(c)
    logprobs = torch.zeros(R, To + 1)
    hits = torch.zeros(R, To + 1, dtype=torch.bool)
    lp, hit = _pick(first.float()[torch.tensor(row_item, device=device)], targets[:, 0].to(device))
    logprobs[:, 0], hits[:, 0] = lp.cpu(), hit.cpu()
    if To > 0:
        # Rows with shorter continuations feed padding at the end; `valid` drops what it predicts.
        starts = torch.tensor([len(contexts[b]) for b in row_item], device=device)
        h = model.extend(
            targets[:, :To].to(device), starts, [t[:R] for t in cache.k], [t[:R] for t in cache.v]
        )
        chunk = max(1, LOGITS_BUDGET // (To * model.config.vocab_size))
        for start in range(0, R, chunk):
            rows = slice(start, min(start + chunk, R))
            logits = model.logits(h[rows]).float()  # (r, To, V)
            lp, hit = _pick(logits, targets[rows, 1:].to(device))
            logprobs[rows, 1:], hits[rows, 1:] = lp.cpu(), hit.cpu()

    valid = torch.arange(To + 1)[None, :] < lengths[:, None]  # (R, To + 1)
    sums = (logprobs * valid).sum(dim=1, dtype=torch.float64)
    greedy = (hits | ~valid).all(dim=1)
    flat = [ContinuationScore(float(sums[r]), int(lengths[r]), bool(greedy[r])) for r in range(R)]
    out, r = [], 0
    for item in conts:
        out.append(flat[r : r + len(item)])
        r += len(item)
    return out


def _pick(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """log P(target) and whether target is the argmax, for logits (..., V) and targets (...)."""
    logprob = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    return logprob, logits.argmax(dim=-1) == targets
