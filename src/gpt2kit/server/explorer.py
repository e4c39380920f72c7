"""What the Explorer page shows: next-token probabilities, attention weights, the logit lens.

Pure functions of a model and token ids. Attention weights are computed explicitly,
softmax(q k^T / sqrt(hs)) under the causal mask, from each block's own `c_attn` output,
because the model's fused scaled_dot_product_attention never materialises them. The
residual stream is advanced with the model's own blocks, so every number shown is the
model's.

>>> next_tokens(model, [15496, 995], k=3)  # doctest: +SKIP
[(11, 0.12), (13, 0.08), (0, 0.05)]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpt2kit.model import GPT2


def _embed(model: GPT2, ids: list[int]) -> Tensor:
    idx = torch.tensor([ids], device=model.wte.weight.device)  # (1, T)
    pos = torch.arange(len(ids), device=idx.device).unsqueeze(0)  # (1, T)
    return model.wte(idx) + model._positions(pos)  # (1, T, C)


def _lm_head(model: GPT2, x: Tensor) -> Tensor:
    """ln_f, then the tied wte projection: logits (..., V) from a residual stream (..., C)."""
    return torch.nn.functional.linear(model.ln_f(x), model.wte.weight[: model.config.vocab_size])


@torch.inference_mode()
def next_tokens(
    model: GPT2, ids: list[int], *, k: int = 10, temperature: float = 1.0
) -> list[tuple[int, float]]:
    """The k most likely next tokens after `ids` with their probabilities, most likely first."""
    logits = model(torch.tensor([ids], device=model.wte.weight.device), last_only=True).logits[0, -1]
    probs = (logits.float() / temperature).softmax(dim=-1)
    values, order = torch.topk(probs, min(k, probs.shape[-1]))
    return [(int(i), float(p)) for i, p in zip(order, values, strict=True)]


@torch.inference_mode()
def attention(model: GPT2, ids: list[int], *, layer: int) -> Tensor:
    """Attention weights of block `layer`, (nh, T, T): row i sums to 1 over positions <= i."""
    x = _embed(model, ids)
    for i, block in enumerate(model.h):
        if i == layer:
            return _attention_weights(block.attn, block.ln_1(x))[0]
        x = block(x, None, True)
    raise IndexError(f"layer {layer} out of range for a model with {len(model.h)} blocks")


def _attention_weights(attn: torch.nn.Module, x: Tensor) -> Tensor:
    B, T, C = x.shape
    q, k, _ = attn.c_attn(x).split(C, dim=2)
    q = q.view(B, T, attn.n_head, attn.head_size).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, attn.n_head, attn.head_size).transpose(1, 2)  # (B, nh, T, hs)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(attn.head_size)  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


@torch.inference_mode()
def logit_lens(model: GPT2, ids: list[int], *, k: int = 3) -> list[list[tuple[int, float]]]:
    """Per layer (0 = embeddings, i = after block i), the top-k next tokens at the last position.

    Each layer's residual stream goes through ln_f and the tied output projection, as if
    the model stopped there (nostalgebraist's "logit lens"); the last entry is the
    model's own prediction.
    """
    x = _embed(model, ids)
    out = []
    for i in range(len(model.h) + 1):
        if i > 0:
            x = model.h[i - 1](x, None, True)
        probs = _lm_head(model, x[0, -1]).float().softmax(dim=-1)
        values, order = torch.topk(probs, k)
        out.append([(int(t), float(p)) for t, p in zip(order, values, strict=True)])
    return out
