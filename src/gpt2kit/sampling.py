"""Choosing the next token from logits: pure functions, explicit generators, no globals.

Each row of a batch draws from its own `torch.Generator`, so a prompt sampled in a batch
gets exactly the tokens it gets alone with the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gpt2kit.errors import ConfigError


def check_sampling(*, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise ConfigError naming the bad option (the flags are spelled as on the CLI)."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ConfigError(f"--top-k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p!r}")


def make_generators(
    seed: int | Sequence[int] | None, batch_size: int, device: torch.device
) -> list[torch.Generator] | None:
    """One generator per row: row i uses `seed + i` (or `seed[i]` for a list), None = fresh randomness."""
    if seed is None:
        return None
    seeds = [seed + i for i in range(batch_size)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch_size:
        raise ConfigError(f"got {len(seeds)} seeds for a batch of {batch_size} rows; pass one per row")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits in each row (ties at the k-th value are kept), -inf the rest."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float | Tensor) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus).

    `p` is one float, or one value per row (B,) (the server batches rows with their own p);
    a row whose p is >= 1 is left as it is.
    """
    if not isinstance(p, Tensor) and p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    # Drop a token when the tokens before it already reach p; the top token always stays.
    if isinstance(p, Tensor):
        drop_sorted = (before >= p[:, None]) & (p < 1)[:, None]
    else:
        drop_sorted = before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_from_probs(probs: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Draw one token per row with the exponential race (argmax p/q, q ~ Exp(1)): no host sync."""
    if generators is None:
        q = torch.empty_like(probs).exponential_(1)
    else:
        q = torch.stack(
            [
                torch.empty_like(row).exponential_(1, generator=g)
                for row, g in zip(probs, generators, strict=True)
            ]
        )
    return (probs / q).argmax(dim=-1)
