"""What the Explorer page shows: next-token choices, surprise, attention, the logit lens.

Pure functions of a model and token ids. Attention weights are computed explicitly,
softmax(q k^T / sqrt(hs)) under the causal mask, from each block's own `c_attn` output,
because the model's fused scaled_dot_product_attention never materialises them. The
residual stream is advanced with the model's own blocks, so every number shown is the
model's. Nothing here holds more than one forward pass's memory at the context limit:
attention is computed for the one head asked for, and logits over the vocabulary are
read `CHUNK` positions at a time.

>>> [c.id for c in sampling_view(model, [15496, 995], k=3).candidates]  # doctest: +SKIP
[11, 13, 0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gpt2kit.generation.config import SamplingConfig, row_generator, uniforms
from gpt2kit.generation.processors import History, next_tokens, reshape
from gpt2kit.model.gpt2 import GPT2

CHUNK = 128  # positions whose (CHUNK, vocab) logits are held at once


def embeddings(model: GPT2, ids: list[int]) -> Tensor:
    """wte + wpe of `ids`, the residual stream entering block 0: (1, T, C)."""
    idx = torch.tensor([ids], device=model.wte.weight.device)  # (1, T)
    pos = torch.arange(len(ids), device=idx.device).unsqueeze(0)  # (1, T)
    return model.wte(idx) + model._positions(pos)  # (1, T, C)


def _lm_head(model: GPT2, x: Tensor) -> Tensor:
    """ln_f, then the tied wte projection: logits (..., V) from a residual stream (..., C)."""
    return model.logits(model.ln_f(x))


# --- next token and sampling ------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """A candidate next token: `prob` after temperature, `kept_prob` after the filters too."""

    id: int
    prob: float
    kept_prob: float


@dataclass(frozen=True)
class NextTokens:
    candidates: list[Choice]  # the k most likely after temperature, most likely first
    kept: int  # how many vocabulary entries survive top-k and top-p
    sampled: Choice | None  # the token drawn with `seed`, when one was given


@torch.inference_mode()
def sampling_view(
    model: GPT2,
    ids: list[int],
    *,
    k: int = 10,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> NextTokens:
    """The distribution before and after the sampling filters, and optionally one draw.

    Filters run in `transformers`' order: temperature, then top-k, then top-p over what
    top-k left; `kept_prob` is the renormalised result (0 for a filtered-out token).
    `top_k` 0 or None is off. The draw uses the sampler of `gpt2kit generate`, so with the
    same seed it picks the token `generate(..., max_new_tokens=1, seed=seed)` picks.

    >>> view = sampling_view(model, [464], k=5, temperature=0.8, top_k=40, seed=7)  # doctest: +SKIP
    >>> sum(c.kept_prob for c in view.candidates) <= 1  # doctest: +SKIP
    True
    """
    logits = model(torch.tensor([ids], device=model.wte.weight.device), last_only=True).logits[:, -1]
    logits = logits.float()  # (1, V)
    probs = (logits / temperature).softmax(dim=-1)[0]
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    kept = reshape(logits, config).softmax(dim=-1)[0]
    values, order = torch.topk(probs, min(k, probs.shape[-1]))
    candidates = [Choice(int(i), float(p), float(kept[i])) for i, p in zip(order, values, strict=True)]
    sampled = None
    if seed is not None:
        u = uniforms([row_generator(config.row_seed(0), logits.device)], logits.device)
        token = int(next_tokens(logits, config, History(), u)[0])
        sampled = Choice(token, float(probs[token]), float(kept[token]))
    return NextTokens(candidates, int((kept > 0).sum()), sampled)


# --- surprise: every token's log-probability and rank ------------------------------------


@dataclass(frozen=True)
class Surprise:
    logprobs: list[float]  # natural log of P(token i | <|endoftext|>, tokens before i)
    ranks: list[int]  # 1 = the model's top choice at that position


@torch.inference_mode()
def surprise(model: GPT2, ids: list[int], *, bos: int) -> Surprise:
    """Log-probability and rank of every token of `ids`, scored after a leading `bos`.

    The first token is predicted from `bos` alone (as `gpt2kit eval` scores a text), so
    every token has a value. A token's rank is 1 + the number of tokens the model scored
    strictly higher. `ids` may fill the whole context: the last token is never fed.
    """
    device = model.wte.weight.device
    inputs = torch.tensor([[bos, *ids[:-1]]], device=device)  # (1, T)
    targets = torch.tensor(ids, device=device)  # (T,)
    positions = torch.arange(len(ids), device=device).unsqueeze(0)
    h = model.hidden_states(inputs, positions, None, True)[0]  # (T, C), ln_f applied
    logprobs: list[float] = []
    ranks: list[int] = []
    for s in range(0, len(ids), CHUNK):
        logits = model.logits(h[s : s + CHUNK]).float()  # (chunk, V)
        own = logits.gather(1, targets[s : s + CHUNK, None])  # (chunk, 1)
        logprobs += (own[:, 0] - logits.logsumexp(dim=-1)).tolist()
        ranks += ((logits > own).sum(dim=-1) + 1).tolist()
    return Surprise(logprobs, ranks)


# --- attention ----------------------------------------------------------------------------


def _block_input(model: GPT2, ids: list[int], layer: int) -> Tensor:
    """ln_1 of the residual stream entering block `layer`: (1, T, C)."""
    if not 0 <= layer < len(model.h):
        raise IndexError(f"layer {layer} out of range for a model with {len(model.h)} blocks")
    x = embeddings(model, ids)
    for block in model.h[:layer]:
        x = block(x, None, True)
    return model.h[layer].ln_1(x)


def heads_qkv(attn: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of every head, each (B, nh, T, hs), from the block's own c_attn."""
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    return tuple(t.view(B, T, attn.n_head, attn.head_size).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]


def _causal_softmax(scores: Tensor) -> Tensor:
    """Softmax over keys (last dim) for queries 0..T-1 that see keys 0..i: (..., T, T)."""
    T = scores.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


@torch.inference_mode()
def attention(model: GPT2, ids: list[int], *, layer: int) -> Tensor:
    """Attention weights of every head of block `layer`, (nh, T, T): row i sums to 1 over <= i."""
    x = _block_input(model, ids, layer)
    attn = model.h[layer].attn
    q, k, _ = heads_qkv(attn, x)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(attn.head_size)  # (1, nh, T, T)
    return _causal_softmax(scores)[0]


@torch.inference_mode()
def attention_head(model: GPT2, ids: list[int], *, layer: int, head: int) -> Tensor:
    """One head's attention weights, (T, T): only that head's T x T is ever built."""
    x = _block_input(model, ids, layer)
    attn = model.h[layer].attn
    q, k, _ = heads_qkv(attn, x)
    scores = (q[0, head] @ k[0, head].T).float() / math.sqrt(attn.head_size)  # (T, T)
    return _causal_softmax(scores)


@dataclass(frozen=True)
class AttentionStep:
    """The arithmetic of one query in one head, over the keys it may see (0..position)."""

    position: int
    scale: float  # 1 / sqrt(hs)
    query: Tensor  # (hs,)
    keys: Tensor  # (position + 1, hs)
    dots: Tensor  # (position + 1,): q . k_j
    scores: Tensor  # dots * scale
    weights: Tensor  # softmax(scores): sums to 1
    values: Tensor  # (position + 1, hs)
    output: Tensor  # (hs,): sum_j weights_j v_j, the head's output before c_proj


@torch.inference_mode()
def attention_step(model: GPT2, ids: list[int], *, layer: int, head: int, position: int) -> AttentionStep:
    """Query `position` of one head worked through: the seeds' picture of masked self-attention."""
    if not 0 <= position < len(ids):
        raise IndexError(f"position {position} out of range for {len(ids)} tokens")
    attn = model.h[layer].attn
    q, k, v = heads_qkv(attn, _block_input(model, ids[: position + 1], layer))  # causal: the rest is unseen
    query, keys, values = q[0, head, -1].float(), k[0, head].float(), v[0, head].float()
    scale = 1.0 / math.sqrt(attn.head_size)
    dots = keys @ query  # (position + 1,)
    scores = dots * scale
    weights = scores.softmax(dim=-1)
    return AttentionStep(position, scale, query, keys, dots, scores, weights, values, weights @ values)


# --- the logit lens -----------------------------------------------------------------------


@torch.inference_mode()
def logit_lens(
    model: GPT2, ids: list[int], *, k: int = 3, position: int = -1
) -> list[list[tuple[int, float]]]:
    """Per layer (0 = embeddings, i = after block i), the top-k next tokens at `position`.

    Each layer's residual stream goes through ln_f and the tied output projection, as if
    the model stopped there (nostalgebraist's "logit lens"); at the last position the last
    entry is the model's own prediction.
    """
    x = embeddings(model, ids)
    out = []
    for i in range(len(model.h) + 1):
        if i > 0:
            x = model.h[i - 1](x, None, True)
        probs = _lm_head(model, x[0, position]).float().softmax(dim=-1)
        values, order = torch.topk(probs, k)
        out.append([(int(t), float(p)) for t, p in zip(order, values, strict=True)])
    return out


@torch.inference_mode()
def lens_grid(model: GPT2, ids: list[int]) -> tuple[Tensor, Tensor]:
    """The logit lens at every position: top token ids and probabilities, each (n_layer + 1, T)."""
    x = embeddings(model, ids)[0]  # (T, C)
    top_ids, top_probs = [], []
    for i in range(len(model.h) + 1):
        if i > 0:
            x = model.h[i - 1](x[None], None, True)[0]
        best = [
            _lm_head(model, x[s : s + CHUNK]).float().softmax(dim=-1).max(dim=-1)
            for s in range(0, len(ids), CHUNK)
        ]
        top_probs.append(torch.cat([b.values for b in best]))
        top_ids.append(torch.cat([b.indices for b in best]))
    return torch.stack(top_ids), torch.stack(top_probs)
