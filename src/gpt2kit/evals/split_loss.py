"""A model's loss on a whole data split, in nats per token and bits per byte.

Training estimates loss on a few random blocks; this scores every token of a split once, in
consecutive blocks of `block_size + 1` tokens (each block predicts its last `block_size`
tokens from the ones before). Bits per byte divides the summed loss by the UTF-8 bytes of
the predicted tokens (`<|endoftext|>` counts 0 bytes), so models with different tokenizers
compare: bits/byte = loss (nats/token) * tokens / bytes / ln 2.

>>> result = split_loss(model, TokenData.open("data/shakespeare"), "val", block_size=256)  # doctest: +SKIP
>>> result["loss"], result["bits_per_byte"]  # doctest: +SKIP
(4.12, 1.95)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gpt2kit.data.shards import TokenData
from gpt2kit.errors import DataError
from gpt2kit.evals.stats import bits_per_byte
from gpt2kit.model.gpt2 import GPT2


@torch.no_grad()
def split_loss(
    model: GPT2, data: TokenData, split: str = "val", *, block_size: int | None = None, batch_size: int = 16
) -> dict[str, Any]:
    """{"loss": nats/token, "bits_per_byte", "tokens", "bytes"} of `model` on the split."""
    T = block_size or model.config.n_positions
    ids = np.asarray(data.tokens(split), dtype=np.int64)
    n_blocks = (len(ids) - 1) // T
    if n_blocks < 1:
        raise DataError(f"{data.path}: the {split!r} split has {len(ids)} tokens, fewer than {T + 1}")
    tokenizer = data.tokenizer()
    lengths = np.array(
        [0 if i == data.eot_token else len(tokenizer.decode_bytes([i])) for i in range(data.n_vocab)],
        dtype=np.int64,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = 0.0
    for first in range(0, n_blocks, batch_size):
        rows = range(first, min(first + batch_size, n_blocks))
        block = torch.from_numpy(np.stack([ids[r * T : r * T + T + 1] for r in rows])).to(device)
        logits = model(block[:, :-1]).logits.float()  # (B, T, V)
        nll += F.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten(), reduction="sum").item()
    model.train(was_training)
    predicted = ids[1 : n_blocks * T + 1]  # every block's targets, back to back
    tokens = predicted.size
    n_bytes = int(lengths[predicted].sum())
    return {
        "loss": nll / tokens,
        "bits_per_byte": bits_per_byte(nll, n_bytes),
        "tokens": tokens,
        "bytes": n_bytes,
    }
