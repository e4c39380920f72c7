"""Random training blocks from memory-mapped token shards, as a pure function of the step.

Micro-batch `micro` of optimizer step `step` is drawn from a generator seeded with
(seed, split, step, micro) and nothing else, so:
- resuming needs no sampler state beyond the step number (it is saved anyway),
- N processes reading micro-batches `rank, rank + N, ...` together see exactly the
  micro-batches one process reads with the same global batch.

>>> sampler = BlockSampler(TokenData.open("data/shakespeare"), "train", block_size=256, seed=1)  # doctest: +SKIP
>>> x, y = sampler.batch(step=0, micro=0, batch_size=8)  # (8, 256) inputs, targets shifted by one  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch

from gpt2kit.data.shards import TokenData
from gpt2kit.errors import DataError

# Mixed into the seed so train and val (and evaluation) draws never coincide.
STREAMS = {"train": 0, "val": 1, "eval-train": 2, "eval-val": 3}


class BlockSampler:
    """Draws (B, T) input blocks and their targets (the same tokens shifted left by one)."""

    def __init__(self, data: TokenData, split: str, *, block_size: int, seed: int) -> None:
        self.split = split
        self.block_size = block_size
        self.seed = seed
        self.shards = data.shards(split)
        # Valid start offsets per shard: a block needs block_size + 1 tokens (inputs + 1 target).
        starts = np.array([max(len(s) - block_size, 0) for s in self.shards], dtype=np.int64)
        self.total = int(starts.sum())
        if self.total == 0:
            n = sum(len(s) for s in self.shards)
            raise DataError(
                f"{data.path}: the {split!r} split has {n} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; lower block_size or prepare more text"
            )
        self.cumulative = np.cumsum(starts)

    def offsets(self, *, step: int, micro: int, batch_size: int, stream: str | None = None) -> np.ndarray:
        """(batch_size,) global start offsets: a pure function of (seed, stream, step, micro)."""
        key = STREAMS[stream or self.split]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, key, step, micro])))
        return rng.integers(0, self.total, size=batch_size, dtype=np.int64)

    def batch(
        self, *, step: int, micro: int, batch_size: int, stream: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, int64 tensors of shape (batch_size, block_size)."""
        T = self.block_size
        rows = np.empty((batch_size, T + 1), dtype=np.int64)
        for i, g in enumerate(self.offsets(step=step, micro=micro, batch_size=batch_size, stream=stream)):
            shard = int(np.searchsorted(self.cumulative, g, side="right"))
            start = int(g - (self.cumulative[shard - 1] if shard else 0))
            rows[i] = self.shards[shard][start : start + T + 1]
        block = torch.from_numpy(rows)
        return block[:, :-1], block[:, 1:]


def micro_steps(grad_accum: int, *, rank: int, world_size: int) -> range:
    """The micro-batch indices this process runs in each optimizer step.

    >>> list(micro_steps(4, rank=1, world_size=2))
    [1, 3]
    """
    return range(rank, grad_accum, world_size)
