"""Perplexity and bits per byte of a text, with a sliding window (the paper's WikiText/PTB/enwik8 numbers).

The text is prefixed with <|endoftext|> and every text token is predicted exactly once.
With a stride S below the context C, windows of C tokens start at 0, S, 2S, ...; each
scores only its last `end - prev_end` tokens, the ones the previous window didn't, so
each token is scored with the longest left context its window gives (the method of
Hugging Face's perplexity guide). S == C means lm-eval-harness's disjoint rolling
windows: the text tokens are cut into consecutive blocks of C, and each block is scored
from the token just before it plus the block minus its last token (C inputs, C
predictions; the first block's input starts with <|endoftext|>). A window runs as one
context pass plus the scored tokens on top of it (`scoring.score_continuations`), so no
logits are computed for unscored positions.

>>> result = evaluate_perplexity(model, tokenizer, "Some text.", stride=512)  # doctest: +SKIP
>>> result["perplexity"], result["bits_per_byte"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpt2kit.errors import ConfigError, DataError
from gpt2kit.evals.scoring import score_continuations
from gpt2kit.evals.stats import bits_per_byte, exp_nll
from gpt2kit.generation.prompts import eos_id
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.tokenizer.tokenizer import Tokenizer


def windows(n_tokens: int, *, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, prev_end, end) of each window over a sequence of `n_tokens` (EOT included).

    Window k feeds tokens [begin, end - 1) and scores positions [max(prev_end, 1), end).
    A stride below `context` overlaps the windows; `stride == context` gives disjoint blocks
    of `context` scored tokens, each fed from the token before it.

    >>> windows(10, context=4, stride=2)
    [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    >>> windows(10, context=4, stride=4)
    [(0, 1, 5), (4, 5, 9), (8, 9, 10)]
    """
    if not 1 <= stride <= context:
        raise ConfigError(
            f"--stride must be in [1, {context}] (at most the model's context of {context}; "
            f"{context} = disjoint windows), got {stride}; pass a stride in that range"
        )
    if stride == context:
        return _disjoint_windows(n_tokens, context=context)
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append((begin, prev_end, end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _disjoint_windows(n_tokens: int, *, context: int) -> list[tuple[int, int, int]]:
    """lm-eval-harness's rolling windows: targets [p, p + context) are fed inputs [p - 1, p + context - 1).

    The overlapping loop can't take stride == context: each window's first token would be
    fed but never predicted. Feeding the token before each block instead predicts every
    one of them, with `context` inputs per window.
    """
    return [(p - 1, p, min(p + context, n_tokens)) for p in range(1, n_tokens, context)]


def evaluate_perplexity(
    model: GPT2,
    tokenizer: Tokenizer,
    text: str,
    *,
    stride: int | None = None,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Token perplexity and bits per byte of `text`; `stride` defaults to half the context.

    `<|endoftext|>` inside the text is ordinary text here (it is counted in the bytes).
    `perplexity` is inf when the mean NLL is too large for exp() (above ~709 nats).
    `progress(n)` is called as n windows finish.
    """
    if not text:
        raise DataError("the text is empty; perplexity needs at least one token")
    context = model.config.n_positions
    stride = context // 2 if stride is None else stride
    ids = [eos_id(model, tokenizer), *tokenizer.encode_ordinary(text)]
    spans = windows(len(ids), context=context, stride=stride)
    requests = [
        (ids[begin : max(prev_end, begin + 1)], ids[max(prev_end, begin + 1) : end])
        for begin, prev_end, end in spans
    ]
    scores = score_continuations(model, requests, batch_size=batch_size, progress=progress)
    n_tokens = sum(s.n_tokens for s in scores)
    assert n_tokens == len(ids) - 1, "every text token is scored exactly once"
    nll = -sum(s.logprob for s in scores)
    n_bytes = len(text.encode("utf-8"))
    return {
        "perplexity": exp_nll(nll / n_tokens),
        "bits_per_byte": bits_per_byte(nll, n_bytes),
        "nll_per_token": nll / n_tokens,
        "total_nll_nats": nll,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_chars": len(text),
        "n_windows": len(spans),
        "context": context,
        "stride": stride,
    }
