"""Direct logit attribution, checked against transformers' model taken apart with forward hooks."""

from __future__ import annotations

import pytest
import torch

from conftest import from_hf, hf_model
from gpt2kit.server.attribution import direct_logit_attribution

IDS = [464, 9379, 6497, 510, 262, 2613, 780, 340]  # "The robot picked up the ball because it"
N_LAYER, N_HEAD, C = 3, 4, 48


@pytest.fixture(scope="module")
def models():
    hf = hf_model(seed=11, vocab_size=50257, n_positions=64, n_embd=C, n_layer=N_LAYER, n_head=N_HEAD)
    return from_hf(hf), hf


@torch.no_grad()
def reference(hf, ids: list[int], token_id: int) -> dict[str, object]:
    """The same attribution from transformers' modules: every piece read off a hook, in float64."""
    t = hf.transformer
    seen: dict[str, torch.Tensor] = {}
    hooks = [t.ln_f.register_forward_pre_hook(lambda _m, args: seen.__setitem__("stream", args[0]))]
    for i, block in enumerate(t.h):
        hooks.append(
            block.attn.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(f"attn.{i}", o[0]))
        )
        hooks.append(block.mlp.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(f"mlp.{i}", o)))
        hooks.append(
            block.attn.c_proj.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(f"y.{i}", a[0]))
        )
    try:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()
    stream = seen["stream"][0, -1].double()
    scale = 1 / torch.sqrt(stream.var(unbiased=False) + t.ln_f.eps)
    d = t.wte.weight[token_id].double() * t.ln_f.weight.double()
    embed = (t.wte.weight[ids[-1]] + t.wpe.weight[len(ids) - 1]).double()
    parts = {"embed": float(scale * embed @ d)}
    heads, proj_bias = [], []
    hs = C // N_HEAD
    for i, block in enumerate(t.h):
        parts[f"attn.{i}"] = float(scale * seen[f"attn.{i}"][0, -1].double() @ d)
        parts[f"mlp.{i}"] = float(scale * seen[f"mlp.{i}"][0, -1].double() @ d)
        y = seen[f"y.{i}"][0, -1].double()  # the heads side by side, before c_proj
        w = block.attn.c_proj.weight.double()  # Conv1D: [in, out]
        heads.append(
            [float(scale * (y[h * hs : (h + 1) * hs] @ w[h * hs : (h + 1) * hs]) @ d) for h in range(N_HEAD)]
        )
        proj_bias.append(float(scale * block.attn.c_proj.bias.double() @ d))
    return {"logit": float(logits[token_id]), "parts": parts, "heads": heads, "proj_bias": proj_bias}


def test_parts_add_up_to_the_logit(models) -> None:
    ours, hf = models
    a = direct_logit_attribution(ours, IDS)
    with torch.no_grad():
        logits = hf(torch.tensor([IDS])).logits[0, -1]
    assert a.token_id == int(logits.argmax())  # the default is the top next token
    assert a.logit == pytest.approx(float(logits[a.token_id]), abs=1e-4)
    assert [name for name, _ in a.parts] == ["embed"] + [
        f"{k}.{i}" for i in range(N_LAYER) for k in ("attn", "mlp")
    ]
    assert sum(v for _, v in a.parts) + a.bias == pytest.approx(a.logit, abs=1e-3)


@pytest.mark.parametrize("token_id", [0, 340, 50256])
def test_parts_and_heads_match_transformers(models, token_id) -> None:
    ours, hf = models
    a = direct_logit_attribution(ours, IDS, token_id=token_id)
    ref = reference(hf, IDS, token_id)
    assert a.token_id == token_id
    assert a.logit == pytest.approx(ref["logit"], abs=1e-4)
    assert dict(a.parts) == pytest.approx(ref["parts"], abs=1e-4)
    assert sum(v for _, v in a.parts) + a.bias == pytest.approx(a.logit, abs=1e-3)
    for i in range(N_LAYER):
        assert a.heads[i] == pytest.approx(ref["heads"][i], abs=1e-4)
        # The heads of a layer add up to its attention output less c_proj's bias.
        assert sum(a.heads[i]) == pytest.approx(dict(a.parts)[f"attn.{i}"] - ref["proj_bias"][i], abs=1e-4)


def test_bias_is_ln_f_bias_and_centring(models) -> None:
    ours, _ = models
    a = direct_logit_attribution(ours, IDS, token_id=42)
    with torch.no_grad():
        x = ours.wte(torch.tensor([IDS])) + ours.wpe(torch.arange(len(IDS)))  # the model's own blocks
        for block in ours.h:
            x = block(x, None, True)
        stream = x[0, -1].double()
        scale = 1 / torch.sqrt(stream.var(unbiased=False) + ours.ln_f.eps)
        d = ours.wte.weight[42].double() * ours.ln_f.weight.double()
        expected = ours.wte.weight[42].double() @ ours.ln_f.bias.double() - scale * stream.mean() * d.sum()
    assert a.bias == pytest.approx(float(expected), abs=1e-6)


def test_one_token_prompt(models) -> None:
    ours, hf = models
    a = direct_logit_attribution(ours, [50256])
    ref = reference(hf, [50256], a.token_id)
    assert dict(a.parts) == pytest.approx(ref["parts"], abs=1e-4)
    assert sum(v for _, v in a.parts) + a.bias == pytest.approx(a.logit, abs=1e-3)
