"""Direct logit attribution: how much each part of the residual stream adds to one logit.

At the last position the residual stream is a sum, x = embed + sum_i (attn_i + mlp_i),
and the logit of token t is wte[t] . ln_f(x). ln_f is linear in x once its scale
s = 1 / sqrt(var(x) + eps) is frozen at this position (as TransformerLens does), so

    logit = sum_parts s * (part . d) + bias,   d = wte[t] * ln_f.weight,
    bias  = wte[t] . ln_f.bias - s * mean(x) * sum(d)   (ln_f's bias and its centring).

Each part is counted as it enters the stream: `attn.{i}` includes c_proj's bias, and
`heads[i][h]` is head h's share of it, s * (W_O[:, h] y_h) . d, which excludes that bias,
so sum(heads[i]) = attn.{i} - s * (c_proj.bias . d). The parts are not centred one by one
(TransformerLens centres them): the centring of the whole stream is the `bias` term.

>>> a = direct_logit_attribution(model, [464, 9379])  # doctest: +SKIP
>>> sum(v for _, v in a.parts) + a.bias - a.logit  # doctest: +SKIP
0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gpt2kit.model.gpt2 import GPT2
from gpt2kit.server.explorer import embeddings, heads_qkv


@dataclass(frozen=True)
class Attribution:
    token_id: int
    logit: float  # the model's own logit for token_id at the last position
    bias: float
    parts: list[tuple[str, float]]  # ("embed", v), ("attn.0", v), ("mlp.0", v), ...
    heads: list[list[float]]  # per layer, per head


@torch.inference_mode()
def direct_logit_attribution(model: GPT2, ids: list[int], *, token_id: int | None = None) -> Attribution:
    """Split the logit of `token_id` (default: the top next token) after `ids` into parts."""
    x = embeddings(model, ids)  # (1, T, C)
    pieces: list[tuple[str, Tensor]] = [("embed", x[0, -1])]
    head_outputs: list[Tensor] = []  # per layer (nh, C)
    for i, block in enumerate(model.h):
        h = block.ln_1(x)
        a = block.attn(h, None, True)  # (1, T, C), the model's own attention output
        head_outputs.append(_head_outputs(block.attn, h))
        x = x + a
        m = block.mlp(block.ln_2(x))
        x = x + m
        pieces += [(f"attn.{i}", a[0, -1]), (f"mlp.{i}", m[0, -1])]
    logits = model.logits(model.ln_f(x[0, -1])).float()  # (V,)
    t = int(logits.argmax()) if token_id is None else token_id

    # Float64 for the decomposition: the parts of a large logit cancel each other.
    ln_f = model.ln_f
    stream = x[0, -1].double()
    scale = 1.0 / torch.sqrt(stream.var(unbiased=False) + ln_f.eps)
    d = model.wte.weight[t].double() * ln_f.weight.double()  # (C,)
    bias = model.wte.weight[t].double() @ ln_f.bias.double() - scale * stream.mean() * d.sum()
    parts = [(name, float(scale * (p.double() @ d))) for name, p in pieces]
    heads = [(scale * (o.double() @ d)).tolist() for o in head_outputs]
    return Attribution(t, float(logits[t]), float(bias), parts, heads)


def _head_outputs(attn: torch.nn.Module, h: Tensor) -> Tensor:
    """Each head's write into the stream at the last position, without c_proj's bias: (nh, C)."""
    q, k, v = heads_qkv(attn, h)  # (1, nh, T, hs)
    scores = (q[0, :, -1:] @ k[0].transpose(-2, -1)) / attn.head_size**0.5  # (nh, 1, T): last sees all
    y = (scores.float().softmax(dim=-1).to(v.dtype) @ v[0])[:, 0]  # (nh, hs)
    w_o = attn.c_proj.weight.reshape(-1, attn.n_head, attn.head_size)  # (C, nh, hs): the columns per head
    return torch.einsum("chs,hs->hc", w_o, y)  # (nh, C)
