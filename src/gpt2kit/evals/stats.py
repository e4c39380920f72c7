"""Mean and standard error of per-item scores (the two numbers every accuracy is reported with),
perplexity from a mean NLL, and bits per byte from a total NLL."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); 0 for one value).

    >>> mean_stderr([1.0, 0.0, 1.0, 0.0])
    (0.5, 0.28867513459481287)
    """
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def with_stderr(**scores: Sequence[float]) -> dict[str, float]:
    """`{name: mean, name_stderr: its standard error}` for each per-item score list, in order.

    >>> with_stderr(acc=[1.0, 0.0])
    {'acc': 0.5, 'acc_stderr': 0.5}
    """
    out: dict[str, float] = {}
    for name, values in scores.items():
        out[name], out[f"{name}_stderr"] = mean_stderr(values)
    return out


def exp_nll(mean_nll: float) -> float:
    """Perplexity from a mean NLL in nats: exp(mean_nll), or inf where that overflows a float.

    A mean NLL above ~709.78 nats (a badly broken model) has no finite float perplexity;
    inf says so instead of crashing the run after all the scoring is done.

    >>> exp_nll(0.0), exp_nll(1000.0)
    (1.0, inf)
    """
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def bits_per_byte(total_nll: float, n_bytes: int) -> float | None:
    """Bits per UTF-8 byte of text whose tokens' summed NLL is `total_nll` nats (None for no bytes).

    Dividing by bytes, not tokens, makes models with different tokenizers comparable:
    bits/byte = nats/token * tokens / bytes / ln 2.

    >>> round(bits_per_byte(math.log(2) * 10, 5), 6)
    2.0
    """
    return total_nll / n_bytes / math.log(2) if n_bytes else None
