"""Logits processors: one composable pipeline from the model's logits to the sampled distribution.

Each processor maps next-token logits (B, V) to new logits, given what every row has
produced so far (`History`). The order is `transformers`' own: repetition penalty and
no-repeat n-grams first (they edit the model's scores), then temperature, top-k, top-p and
min-p (they reshape the distribution sampled from). Greedy decoding takes the argmax after
the first group; temperature and the filters do not change the argmax.

>>> pipe = build_pipeline(temperature=0.7, top_k=40, repetition_penalty=1.2)
>>> [type(p).__name__ for p in pipe.processors]
['RepetitionPenalty', 'Temperature', 'TopK']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from gpt2kit.errors import ConfigError
from gpt2kit.sampling import check_sampling, sample_from_probs, top_k_filter, top_p_filter


class History(NamedTuple):
    """Every row's tokens so far, prompt included: `ids` (B, L) where `valid` (B, L) is True.

    Padding is excluded, so a row scores the same in a batch as alone.
    """

    ids: Tensor
    valid: Tensor

    def rows(self) -> list[list[int]]:
        """The real tokens of each row as Python lists (a host sync; n-gram blocking needs it)."""
        ids, valid = self.ids.cpu(), self.valid.cpu()
        return [row[ok].tolist() for row, ok in zip(ids, valid, strict=True)]


class LogitsProcessor(Protocol):
    def __call__(self, logits: Tensor, history: History) -> Tensor: ...


@dataclass(frozen=True)
class RepetitionPenalty:
    """CTRL's penalty as `transformers` applies it: a seen token's logit is divided by
    `penalty` when positive, multiplied when negative (> 1 discourages repeats).

    >>> h = History(torch.tensor([[0, 2]]), torch.tensor([[True, True]]))
    >>> RepetitionPenalty(2.0)(torch.tensor([[4.0, 1.0, -1.0]]), h)
    tensor([[ 2.,  1., -2.]])
    """

    penalty: float

    def __call__(self, logits: Tensor, history: History) -> Tensor:
        B, V = logits.shape
        # Padding points at a scratch column V, dropped after the scatter.
        ids = history.ids.masked_fill(~history.valid, V)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, ids, True)
        seen = seen[:, :V]
        penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(seen, penalised, logits)


@dataclass(frozen=True)
class NoRepeatNGram:
    """Forbid any token that would complete an n-gram already present in the row (`transformers`' rule).

    >>> h = History(torch.tensor([[1, 2, 3, 1]]), torch.ones(1, 4, dtype=torch.bool))
    >>> NoRepeatNGram(2)(torch.zeros(1, 4), h)  # "1 2" occurred, so 2 may not follow 1
    tensor([[0., 0., -inf, 0.]])
    """

    size: int

    def __call__(self, logits: Tensor, history: History) -> Tensor:
        n = self.size
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        for b, row in enumerate(history.rows()):
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


@dataclass(frozen=True)
class Temperature:
    """Divide logits by t (< 1 sharpens, > 1 flattens).

    >>> Temperature(2.0)(torch.tensor([[2.0, 4.0]]), None)
    tensor([[1., 2.]])
    """

    temperature: float

    def __call__(self, logits: Tensor, history: History | None) -> Tensor:
        return logits / self.temperature


@dataclass(frozen=True)
class TopK:
    """Keep the k most likely tokens (ties at the k-th kept).

    >>> TopK(2)(torch.tensor([[1.0, 3.0, 2.0]]), None)
    tensor([[-inf, 3., 2.]])
    """

    k: int

    def __call__(self, logits: Tensor, history: History | None) -> Tensor:
        return top_k_filter(logits, self.k)


@dataclass(frozen=True)
class TopP:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus).

    >>> TopP(0.6)(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), None).isinf().tolist()
    [[False, False, True]]
    """

    p: float

    def __call__(self, logits: Tensor, history: History | None) -> Tensor:
        return top_p_filter(logits, self.p)


@dataclass(frozen=True)
class MinP:
    """Drop tokens less likely than `p` times the most likely one (`transformers`' min-p).

    >>> MinP(0.5)(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), None).isinf().tolist()
    [[False, False, True]]
    """

    p: float

    def __call__(self, logits: Tensor, history: History | None) -> Tensor:
        probs = logits.softmax(dim=-1)
        threshold = self.p * probs.max(dim=-1, keepdim=True).values
        return logits.masked_fill(probs < threshold, float("-inf"))


@dataclass(frozen=True)
class LogitsPipeline:
    """Processors applied in order; `greedy` picks the argmax of the penalised logits."""

    processors: tuple[LogitsProcessor, ...]
    greedy: bool = False

    @property
    def needs_history(self) -> bool:
        return any(isinstance(p, (RepetitionPenalty, NoRepeatNGram)) for p in self.processors)

    def __call__(self, logits: Tensor, history: History | None) -> Tensor:
        logits = logits.float()
        for p in self.processors:
            logits = p(logits, history)
        return logits

    def pick(
        self,
        logits: Tensor,
        history: History | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """The next token per row (B,): the argmax when greedy, else a draw (one generator per row)."""
        scores = self(logits, history)
        if self.greedy:
            return scores.argmax(dim=-1)
        return sample_from_probs(scores.softmax(dim=-1), generators)


def check_processors(
    *,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
) -> None:
    """Raise ConfigError naming the bad option (the flags are spelled as on the CLI)."""
    if min_p is not None and (not isinstance(min_p, (int, float)) or not 0.0 <= min_p <= 1.0):
        raise ConfigError(f"--min-p must be in [0, 1], got {min_p!r}")
    if repetition_penalty is not None and (
        not isinstance(repetition_penalty, (int, float))
        or not math.isfinite(repetition_penalty)
        or repetition_penalty <= 0
    ):
        raise ConfigError(f"--repetition-penalty must be a number > 0 (1 = off), got {repetition_penalty!r}")
    if no_repeat_ngram_size is not None and (
        not isinstance(no_repeat_ngram_size, int)
        or isinstance(no_repeat_ngram_size, bool)
        or no_repeat_ngram_size < 1
    ):
        raise ConfigError(f"--no-repeat-ngram-size must be an integer >= 1, got {no_repeat_ngram_size!r}")


def build_pipeline(
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    extra: Sequence[LogitsProcessor] = (),
) -> LogitsPipeline:
    """Check the options and build the pipeline; options at their neutral value add nothing.

    `top_k=0` means no top-k filtering, as in `transformers` (the same as None).
    """
    if isinstance(top_k, int) and not isinstance(top_k, bool):
        if top_k < 0:
            raise ConfigError(f"--top-k must be an integer >= 0 (0 = off), got {top_k!r}")
        top_k = top_k or None
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    check_processors(
        min_p=min_p, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size
    )
    procs: list[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(float(repetition_penalty)))
    if no_repeat_ngram_size is not None:
        procs.append(NoRepeatNGram(no_repeat_ngram_size))
    procs.extend(extra)
    greedy = temperature == 0 or top_k == 1
    if not greedy:
        if temperature != 1.0:
            procs.append(Temperature(float(temperature)))
        if top_k is not None:
            procs.append(TopK(top_k))
        if top_p is not None and top_p < 1.0:
            procs.append(TopP(float(top_p)))
        if min_p is not None and min_p > 0:
            procs.append(MinP(float(min_p)))
    return LogitsPipeline(tuple(procs), greedy=greedy)


def sample(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Next token per row (B,) from last-position logits (B, V). temperature 0 = greedy.

    >>> sample(torch.tensor([[0.0, 9.0]]), temperature=0)
    tensor([1])
    """
    pipeline = build_pipeline(temperature=temperature, top_k=top_k, top_p=top_p)
    return pipeline.pick(logits, None, generators)
