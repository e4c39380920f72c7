"""From the model's logits to the next token, as a `SamplingConfig` describes it. Pure functions.

Two stages, in a fixed order (see `SamplingConfig`):
- `penalise` edits the model's scores with what each row has produced so far (`History`):
  logit_bias, the repetition penalty, presence/frequency penalties, no-repeat n-grams;
- `reshape` turns scores into the distribution drawn from: temperature, top-k, top-p, min-p.
Greedy takes the argmax after the first stage (temperature and the filters never move it).
`next_tokens` does both and draws, one uniform number per row.

>>> cfg = SamplingConfig(temperature=0)
>>> next_tokens(torch.tensor([[0.0, 9.0, 1.0]]), cfg, History(), torch.tensor([0.5]))
tensor([1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gpt2kit.generation.config import SamplingConfig, draw, min_p_filter, top_k_filter, top_p_filter


@dataclass
class History:
    """What the penalties read of each of B rows; each part only when a config needs it.

    `seen` (B, V) bool: the token occurs in the row's prompt or output (repetition penalty).
    `counts` (B, V) float: its occurrences in the output (presence/frequency penalties).
    `tokens`: each row's prompt + output ids (no-repeat n-grams).
    """

    seen: Tensor | None = None
    counts: Tensor | None = None
    tokens: Sequence[Sequence[int]] | None = None


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty as `transformers` applies it: a seen token's logit is divided by
    `penalty` when positive, multiplied when negative (> 1 discourages repeats).

    >>> repetition_penalty(torch.tensor([[4.0, 1.0, -1.0]]), torch.tensor([[True, False, True]]), 2.0)
    tensor([[ 2.,  1., -2.]])
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def presence_frequency_penalty(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's penalties: minus `frequency` per occurrence in the output, minus `presence` once.

    >>> presence_frequency_penalty(torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 3.0]]), 0.5, 0.25)
    tensor([[ 0.0000, -0.7500, -1.2500]])
    """
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def no_repeat_ngram(logits: Tensor, tokens: Sequence[Sequence[int]], size: int) -> Tensor:
    """Forbid any token that would complete an n-gram already present in the row (`transformers`' rule).

    >>> no_repeat_ngram(torch.zeros(1, 4), [[1, 2, 3, 1]], 2)  # "1 2" occurred, so 2 may not follow 1
    tensor([[0., 0., -inf, 0.]])
    """
    n = size
    banned_rows: list[int] = []
    banned_ids: list[int] = []
    for b, row in enumerate(tokens):
        row = list(row)
        if len(row) + 1 < n:
            continue
        prefix = tuple(row[len(row) - n + 1 :])
        for i in range(len(row) - n + 1):
            if tuple(row[i : i + n - 1]) == prefix:
                banned_rows.append(b)
                banned_ids.append(row[i + n - 1])
    if not banned_rows:
        return logits
    logits = logits.clone()
    logits[banned_rows, banned_ids] = float("-inf")
    return logits


def add_logit_bias(logits: Tensor, bias: dict[int, float]) -> Tensor:
    """Add `bias[token]` to every row's logit of `token` (ids past the vocabulary are ignored)."""
    ids = [t for t in bias if t < logits.shape[-1]]
    if not ids:
        return logits
    logits = logits.clone()
    logits[:, ids] += torch.tensor([bias[t] for t in ids], dtype=logits.dtype, device=logits.device)
    return logits


def penalise(logits: Tensor, config: SamplingConfig, history: History) -> Tensor:
    """The scores after everything that depends on the row's tokens (float32, (B, V))."""
    logits = logits.float()
    if config.logit_bias:
        logits = add_logit_bias(logits, config.logit_bias)  # type: ignore[arg-type]
    if config.needs_seen:
        assert history.seen is not None, "the repetition penalty needs History.seen"
        logits = repetition_penalty(logits, history.seen, config.repetition_penalty)
    if config.needs_counts:
        assert history.counts is not None, "presence/frequency penalties need History.counts"
        logits = presence_frequency_penalty(
            logits, history.counts, config.presence_penalty, config.frequency_penalty
        )
    if config.no_repeat_ngram_size:
        assert history.tokens is not None, "no-repeat n-grams need History.tokens"
        logits = no_repeat_ngram(logits, history.tokens, config.no_repeat_ngram_size)
    return logits


def reshape(scores: Tensor, config: SamplingConfig) -> Tensor:
    """Temperature, then top-k, top-p and min-p: the logits of the distribution drawn from."""
    if config.temperature not in (0.0, 1.0):
        scores = scores / config.temperature
    if config.top_k is not None:
        scores = top_k_filter(scores, config.top_k)
    if config.top_p < 1.0:
        scores = top_p_filter(scores, config.top_p)
    if config.min_p > 0.0:
        scores = min_p_filter(scores, config.min_p)
    return scores


def next_tokens(logits: Tensor, config: SamplingConfig, history: History, u: Tensor) -> Tensor:
    """The next token of every row (B,): the argmax when greedy, else a draw with `u` (B,)."""
    scores = penalise(logits, config, history)
    if config.greedy:
        return scores.argmax(dim=-1)
    return draw(reshape(scores, config).softmax(dim=-1), u)
