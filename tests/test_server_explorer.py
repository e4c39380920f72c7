"""The Explorer's analysis: next tokens, attention weights and the logit lens, checked
against transformers' own outputs (output_attentions, output_hidden_states)."""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import hf_model
from gpt2kit.checkpoint import from_hf_state_dict
from gpt2kit.config import GPT2Config
from gpt2kit.model import GPT2
from gpt2kit.server import explorer
from server_helpers import make_model_dir, running_server

IDS = [464, 9379, 6497, 510, 262, 2613, 780, 340]  # "The robot picked up the ball because it"


@pytest.fixture(scope="module")
def models():
    hf = hf_model(seed=5, vocab_size=50257, n_positions=64, n_embd=48, n_layer=3, n_head=4)
    hf.config._attn_implementation = "eager"  # so output_attentions returns the weights
    config = GPT2Config.from_hf_dict(hf.config.to_dict())
    with torch.device("meta"):
        ours = GPT2(config)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), ours), assign=True)
    return ours.eval(), hf


def test_attention_matches_transformers(models) -> None:
    ours, hf = models
    with torch.no_grad():
        ref = hf(torch.tensor([IDS]), output_attentions=True).attentions
    for layer in range(3):
        weights = explorer.attention(ours, IDS, layer=layer)  # (nh, T, T)
        assert weights.shape == (4, len(IDS), len(IDS))
        torch.testing.assert_close(weights, ref[layer][0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(weights.sum(-1), torch.ones(4, len(IDS)))
        assert bool((weights.triu(diagonal=1) == 0).all())  # causal: nothing from the future


def test_logit_lens_matches_transformers_hidden_states(models) -> None:
    ours, hf = models
    with torch.no_grad():
        out = hf(torch.tensor([IDS]), output_hidden_states=True)
        hidden = out.hidden_states  # embeddings, after block 1, 2, and (ln_f applied) the last
        lens = explorer.logit_lens(ours, IDS, k=2)
        assert len(lens) == 4
        for layer in range(3):
            logits = hf.lm_head(hf.transformer.ln_f(hidden[layer][0, -1]))
            assert [t for t, _ in lens[layer]] == logits.topk(2).indices.tolist()
            assert lens[layer][0][1] == pytest.approx(float(logits.softmax(-1).max()), rel=1e-4)
        final = out.logits[0, -1]
    assert [t for t, _ in lens[3]] == final.topk(2).indices.tolist()


def test_next_tokens_are_the_softmax(models) -> None:
    ours, hf = models
    top = explorer.next_tokens(ours, IDS, k=10, temperature=0.7)
    with torch.no_grad():
        probs = (hf(torch.tensor([IDS])).logits[0, -1] / 0.7).softmax(-1)
    values, ids = probs.topk(10)
    assert [t for t, _ in top] == ids.tolist()
    assert [p for _, p in top] == pytest.approx(values.tolist(), rel=1e-4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(make_model_dir(tmp_path_factory.mktemp("explorer"), n_positions=64)) as s:
        yield s


def test_api_next(server) -> None:
    r = httpx.post(
        f"{server.url}/api/next", json={"text": "The robot picked up the ball because it", "k": 10}
    )
    assert r.status_code == 200
    data = r.json()
    probs = [t["prob"] for t in data["tokens"]]
    assert len(probs) == 10 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert all(set(t) == {"id", "token", "prob"} for t in data["tokens"])
    assert [t["id"] for t in data["prompt_tokens"]] == IDS
    assert data["prompt_tokens"][1]["token"] == " robot"  # the leading space is part of the token
    empty = httpx.post(f"{server.url}/api/next", json={"text": ""}).json()
    assert [t["token"] for t in empty["prompt_tokens"]] == ["<|endoftext|>"]


def test_api_attention(server) -> None:
    r = httpx.post(f"{server.url}/api/attention", json={"text": "The robot picked it", "layer": 1, "head": 3})
    data = r.json()
    T = len(data["tokens"])
    assert T == 4 and (data["layer"], data["head"], data["n_layer"], data["n_head"]) == (1, 3, 2, 4)
    assert len(data["weights"]) == T and all(len(row) == T for row in data["weights"])
    for i, row in enumerate(data["weights"]):
        assert sum(row) == pytest.approx(1, abs=1e-4) and all(w == 0 for w in row[i + 1 :])


def test_api_lens(server) -> None:
    text = "The robot picked up the ball because it"
    data = httpx.post(f"{server.url}/api/lens", json={"text": text, "k": 3}).json()
    assert [layer["layer"] for layer in data["layers"]] == [0, 1, 2]
    nxt = httpx.post(f"{server.url}/api/next", json={"text": text, "k": 3}).json()
    assert [t["id"] for t in data["layers"][-1]["tokens"]] == [t["id"] for t in nxt["tokens"]]


def test_explorer_page_and_assets(server) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "GPT-2 Explorer" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(f"{server.url}{asset}").status_code == 200
