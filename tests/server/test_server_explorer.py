"""The Explorer's analysis (next tokens and sampling filters, surprise, attention and its
drill-down, the logit lens at every position), checked against transformers' own outputs
(logits, output_attentions, output_hidden_states, forward hooks, its logits warpers)."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import from_hf, hf_model, tiny_model
from gpt2kit.generation.generate import generate
from gpt2kit.server import explorer
from gpt2kit.server.attribution import direct_logit_attribution
from gpt2kit.tokenizer.tokenizer import Tokenizer
from server_helpers import make_model_dir, running_server

IDS = [464, 9379, 6497, 510, 262, 2613, 780, 340]  # "The robot picked up the ball because it"


@pytest.fixture(scope="module")
def models():
    hf = hf_model(seed=5, vocab_size=50257, n_positions=64, n_embd=48, n_layer=3, n_head=4)
    hf.config._attn_implementation = "eager"  # so output_attentions returns the weights
    return from_hf(hf), hf


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
    top = [(c.id, c.prob) for c in explorer.sampling_view(ours, IDS, k=10, temperature=0.7).candidates]
    with torch.no_grad():
        probs = (hf(torch.tensor([IDS])).logits[0, -1] / 0.7).softmax(-1)
    values, ids = probs.topk(10)
    assert [t for t, _ in top] == ids.tolist()
    assert [p for _, p in top] == pytest.approx(values.tolist(), rel=1e-4)


def hooked(hf, ids: list[int], modules: dict[str, torch.nn.Module]) -> tuple[object, dict[str, object]]:
    """Run transformers' model on ids, capturing each named module's output."""
    seen: dict[str, object] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
        for name, m in modules.items()
    ]
    try:
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def test_surprise_matches_transformers(models) -> None:
    ours, hf = models
    got = explorer.surprise(ours, IDS, bos=50256)
    with torch.no_grad():
        logits = hf(torch.tensor([[50256, *IDS[:-1]]])).logits[0]  # (T, V)
    logprobs = logits.log_softmax(-1)
    own = logprobs[torch.arange(len(IDS)), torch.tensor(IDS)]
    assert got.logprobs == pytest.approx(own.tolist(), abs=1e-4)
    order = logits.argsort(dim=-1, descending=True)
    ranks = [1 + order[i].tolist().index(t) for i, t in enumerate(IDS)]
    assert got.ranks == ranks


def test_surprise_rank_one_is_the_top_choice(models) -> None:
    ours, _ = models
    ids = [464]
    for _ in range(5):  # a greedy continuation: every token is the model's top choice
        ids.append(explorer.sampling_view(ours, ids, k=1).candidates[0].id)
    assert explorer.surprise(ours, ids[1:], bos=ids[0]).ranks == [1] * 5


def test_surprise_fills_the_whole_context(models) -> None:
    ours, hf = models
    ids = (IDS * 8)[:64]  # n_positions = 64: the last token is predicted but never fed
    got = explorer.surprise(ours, ids, bos=50256)
    with torch.no_grad():
        logits = hf(torch.tensor([[50256, *ids[:-1]]])).logits[0]
    assert got.logprobs[-1] == pytest.approx(float(logits[-1].log_softmax(-1)[ids[-1]]), abs=1e-4)


def test_attention_head_and_step_match_transformers(models) -> None:
    ours, hf = models
    out, seen = hooked(hf, IDS, {f"c_attn.{i}": hf.transformer.h[i].attn.c_attn for i in range(3)})
    hs = 48 // 4
    for layer, head, position in [(0, 0, 0), (1, 3, 5), (2, 2, 7)]:
        weights = explorer.attention_head(ours, IDS, layer=layer, head=head)
        torch.testing.assert_close(weights, out.attentions[layer][0, head], atol=1e-5, rtol=1e-4)

        q, k, v = seen[f"c_attn.{layer}"][0].split(48, dim=-1)  # (T, C) each
        cols = slice(head * hs, (head + 1) * hs)
        step = explorer.attention_step(ours, IDS, layer=layer, head=head, position=position)
        visible = slice(0, position + 1)
        torch.testing.assert_close(step.query, q[position, cols], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(step.keys, k[visible, cols], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(step.values, v[visible, cols], atol=1e-5, rtol=1e-4)
        dots = k[visible, cols] @ q[position, cols]
        torch.testing.assert_close(step.dots, dots, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(step.scores, dots / hs**0.5, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            step.weights, out.attentions[layer][0, head, position, visible], atol=1e-5, rtol=1e-4
        )
        assert float(step.weights.sum()) == pytest.approx(1.0, abs=1e-6)
        expected = out.attentions[layer][0, head, position, visible] @ v[visible, cols]
        torch.testing.assert_close(step.output, expected, atol=1e-5, rtol=1e-4)


def test_lens_grid_matches_transformers_hidden_states(models) -> None:
    ours, hf = models
    with torch.no_grad():
        out = hf(torch.tensor([IDS]), output_hidden_states=True)
        top_ids, top_probs = explorer.lens_grid(ours, IDS)
        assert top_ids.shape == top_probs.shape == (4, len(IDS))
        for layer in range(4):
            h = out.hidden_states[layer][0]
            if layer < 3:  # transformers' last hidden state already has ln_f applied
                h = hf.transformer.ln_f(h)
            probs = hf.lm_head(h).softmax(-1)  # (T, V)
            assert top_ids[layer].tolist() == probs.argmax(-1).tolist()
            torch.testing.assert_close(top_probs[layer], probs.max(-1).values, atol=1e-6, rtol=1e-4)
    # The last position's column is the last-position lens.
    last = explorer.logit_lens(ours, IDS, k=1)
    assert [row[0][0] for row in last] == top_ids[:, -1].tolist()
    middle = explorer.logit_lens(ours, IDS, k=1, position=3)
    assert [row[0][0] for row in middle] == top_ids[:, 3].tolist()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.7, 40, None), (1.3, None, 0.9), (0.8, 50, 0.5), (2.0, 3, 0.999), (1.0, 1, None)],
)
def test_kept_prob_follows_transformers_warpers(models, temperature, top_k, top_p) -> None:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ours, hf = models
    view = explorer.sampling_view(ours, IDS, k=60, temperature=temperature, top_k=top_k, top_p=top_p)
    with torch.no_grad():
        scores = hf(torch.tensor([IDS])).logits[:, -1]
    before = (scores / temperature).softmax(-1)[0]
    ids = torch.tensor([IDS])
    scores = TemperatureLogitsWarper(temperature)(ids, scores)  # transformers' order
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    kept = scores.softmax(-1)[0]
    assert [c.id for c in view.candidates] == before.topk(60).indices.tolist()
    assert [c.prob for c in view.candidates] == pytest.approx(before.topk(60).values.tolist(), rel=1e-4)
    assert [c.kept_prob for c in view.candidates] == pytest.approx(
        kept[[c.id for c in view.candidates]].tolist(), rel=1e-4, abs=1e-7
    )
    assert view.kept == int((kept > 0).sum())


def test_sampled_token_is_what_generate_picks(models) -> None:
    ours, _ = models
    for seed, options in [(0, {}), (7, {"top_k": 5}), (3, {"top_p": 0.5, "temperature": 0.8})]:
        view = explorer.sampling_view(ours, IDS, seed=seed, **options)
        [row] = generate(ours, [IDS], max_new_tokens=1, seed=seed, **options)
        assert view.sampled is not None and view.sampled.id == row[-1]
        assert view.sampled.kept_prob > 0
    again = explorer.sampling_view(ours, IDS, seed=7, top_k=5)
    assert again.sampled == explorer.sampling_view(ours, IDS, seed=7, top_k=5).sampled


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("explorer"), n_positions=128)


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def hf_served(model_dir):
    """transformers' own load of the served directory: the independent reference."""
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager")
    return model.eval()


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def error(server, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    return r.json()["error"]


TEXT = "The robot picked up the ball because it"


def test_api_next(server) -> None:
    data = post(server, "/api/next", {"text": TEXT, "k": 10})
    probs = [t["prob"] for t in data["tokens"]]
    assert len(probs) == 10 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert all(set(t) == {"id", "token", "prob", "kept_prob"} for t in data["tokens"])
    # No filter: kept_prob is prob, every token is kept, nothing is drawn without a seed.
    assert [t["kept_prob"] for t in data["tokens"]] == pytest.approx(probs, rel=1e-5)
    assert data["kept"] == 50257 and data["sampled"] is None
    assert [t["id"] for t in data["prompt_tokens"]] == IDS
    assert data["prompt_tokens"][1]["token"] == " robot"  # the leading space is part of the token
    empty = post(server, "/api/next", {"text": ""})
    assert [t["token"] for t in empty["prompt_tokens"]] == ["<|endoftext|>"]


def test_api_next_filters_match_transformers(server, hf_served) -> None:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    data = post(
        server, "/api/next", {"text": TEXT, "k": 20, "temperature": 0.7, "top_k": 12, "top_p": 0.3, "seed": 5}
    )
    with torch.no_grad():
        scores = hf_served(torch.tensor([IDS])).logits[:, -1]
    ids = torch.tensor([IDS])
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(12), TopPLogitsWarper(0.3)):
        scores = warper(ids, scores)
    kept = scores.softmax(-1)[0]
    got = [t["kept_prob"] for t in data["tokens"]]
    assert got == pytest.approx(kept[[t["id"] for t in data["tokens"]]].tolist(), rel=1e-4, abs=1e-7)
    assert sum(got) == pytest.approx(1.0, abs=1e-5)  # what survives is within the top 20
    assert data["kept"] == int((kept > 0).sum()) and 1 <= data["kept"] <= 12
    sampled = data["sampled"]
    assert sampled["kept_prob"] > 0 and sampled["id"] in [t["id"] for t in data["tokens"]]
    again = post(
        server, "/api/next", {"text": TEXT, "k": 20, "temperature": 0.7, "top_k": 12, "top_p": 0.3, "seed": 5}
    )
    assert again["sampled"] == sampled  # the shown seed reproduces the draw


def test_api_surprise_matches_transformers(server, hf_served) -> None:
    text = "Hello world, the robot said. Ünïcödé too."
    data = post(server, "/api/surprise", {"text": text})
    ids = Tokenizer.gpt2().encode(text)
    assert [t["id"] for t in data["tokens"]] == ids
    assert all(set(t) == {"id", "token", "logprob", "rank"} for t in data["tokens"])
    with torch.no_grad():
        logits = hf_served(torch.tensor([[50256, *ids[:-1]]])).logits[0]
    own = logits.log_softmax(-1)[torch.arange(len(ids)), torch.tensor(ids)]
    assert [t["logprob"] for t in data["tokens"]] == pytest.approx(own.tolist(), abs=1e-4)
    ranks = [1 + int((logits[i] > logits[i, t]).sum()) for i, t in enumerate(ids)]
    assert [t["rank"] for t in data["tokens"]] == ranks
    bits = -float(own.sum()) / math.log(2)
    assert data["total_bits"] == pytest.approx(bits, rel=1e-5)
    assert data["n_bytes"] == len(text.encode("utf-8"))
    assert data["bits_per_byte"] == pytest.approx(bits / len(text.encode("utf-8")), rel=1e-5)


def test_api_attention(server) -> None:
    data = post(server, "/api/attention", {"text": "The robot picked it", "layer": 1, "head": 3})
    T = len(data["tokens"])
    assert T == 4 and (data["layer"], data["head"], data["n_layer"], data["n_head"]) == (1, 3, 2, 4)
    assert len(data["weights"]) == T and all(len(row) == T for row in data["weights"])
    for i, row in enumerate(data["weights"]):
        assert sum(row) == pytest.approx(1, abs=1e-4) and all(w == 0 for w in row[i + 1 :])
    assert data["detail"] is None


def test_api_attention_drilldown_matches_transformers(server, hf_served) -> None:
    data = post(server, "/api/attention", {"text": TEXT, "layer": 1, "head": 2, "position": 7})
    d = data["detail"]
    captured = {}
    hook = hf_served.transformer.h[1].attn.c_attn.register_forward_hook(
        lambda _m, _i, out: captured.update(qkv=out[0])
    )
    try:
        with torch.no_grad():
            att = hf_served(torch.tensor([IDS]), output_attentions=True).attentions[1][0, 2]
    finally:
        hook.remove()
    q, k, v = captured["qkv"].split(32, dim=-1)
    cols = slice(2 * 8, 3 * 8)  # head 2 of 4, head size 8
    assert d["position"] == 7 and d["scale"] == pytest.approx(8**-0.5)
    assert d["query"] == pytest.approx(q[7, cols].tolist(), abs=1e-5)
    assert torch.allclose(torch.tensor(d["keys"]), k[:, cols], atol=1e-5)
    dots = k[:, cols] @ q[7, cols]
    assert d["dots"] == pytest.approx(dots.tolist(), abs=1e-4)
    assert d["scores"] == pytest.approx((dots / 8**0.5).tolist(), abs=1e-4)
    assert d["weights"] == pytest.approx(att[7].tolist(), abs=1e-5)
    assert data["weights"][7] == pytest.approx(att[7].tolist(), abs=1e-5)
    assert d["output"] == pytest.approx((att[7] @ v[:, cols]).tolist(), abs=1e-5)
    early = post(server, "/api/attention", {"text": TEXT, "layer": 0, "head": 0, "position": 2})["detail"]
    assert len(early["keys"]) == len(early["weights"]) == 3  # a query sees itself and the left only


def test_api_attention_grid(server, hf_served) -> None:
    data = post(server, "/api/attention/grid", {"text": TEXT, "layer": 1})
    assert (data["n_layer"], data["n_head"], data["layer"], data["shown"]) == (2, 4, 1, 8)
    assert data["note"] is None and len(data["heads"]) == 4
    with torch.no_grad():
        att = hf_served(torch.tensor([IDS]), output_attentions=True).attentions[1][0]
    assert torch.allclose(torch.tensor(data["heads"]), att, atol=1e-4)


def test_api_attention_grid_caps_long_prompts(server) -> None:
    text = " word" * 100  # 100 tokens
    data = post(server, "/api/attention/grid", {"text": text, "layer": 0})
    T = len(data["tokens"])
    assert T > 64 and data["shown"] == 64
    assert f"first 64 of {T} tokens" in data["note"]
    assert all(len(h) == data["shown"] and all(len(r) == data["shown"] for r in h) for h in data["heads"])
    # The capped maps are exact: the same as that prefix's maps.
    full = post(server, "/api/attention", {"text": text, "layer": 0, "head": 1})["weights"]
    assert data["heads"][1][10][:11] == pytest.approx(full[10][:11], abs=1e-4)


def test_api_lens(server) -> None:
    data = post(server, "/api/lens", {"text": TEXT, "k": 3})
    assert [layer["layer"] for layer in data["layers"]] == [0, 1, 2] and data["position"] == 7
    nxt = post(server, "/api/next", {"text": TEXT, "k": 3})
    assert [t["id"] for t in data["layers"][-1]["tokens"]] == [t["id"] for t in nxt["tokens"]]


def test_api_lens_grid_matches_transformers(server, hf_served) -> None:
    data = post(server, "/api/lens/grid", {"text": TEXT})
    assert len(data["cells"]) == 3 and all(len(row) == len(IDS) for row in data["cells"])
    with torch.no_grad():
        hidden = hf_served(torch.tensor([IDS]), output_hidden_states=True).hidden_states
        for layer in range(3):
            h = hidden[layer][0] if layer == 2 else hf_served.transformer.ln_f(hidden[layer][0])
            probs = hf_served.lm_head(h).softmax(-1)
            assert [c["id"] for c in data["cells"][layer]] == probs.argmax(-1).tolist()
            assert [c["prob"] for c in data["cells"][layer]] == pytest.approx(
                probs.max(-1).values.tolist(), rel=1e-4
            )
    # A cell's top-k (the page's click) agrees with the grid.
    cell = post(server, "/api/lens", {"text": TEXT, "k": 5, "position": 3})
    assert cell["position"] == 3
    assert [layer["tokens"][0]["id"] for layer in cell["layers"]] == [row[3]["id"] for row in data["cells"]]


def test_api_attribution(server, hf_served) -> None:
    data = post(server, "/api/attribution", {"text": TEXT})
    with torch.no_grad():
        logits = hf_served(torch.tensor([IDS])).logits[0, -1]
    assert data["token_id"] == int(logits.argmax())
    assert data["logit"] == pytest.approx(float(logits.max()), abs=1e-4)
    assert [p["name"] for p in data["parts"]] == ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1"]
    assert sum(p["value"] for p in data["parts"]) + data["bias"] == pytest.approx(data["logit"], abs=1e-3)
    assert len(data["heads"]) == 2 and all(len(h) == 4 for h in data["heads"])
    chosen = post(server, "/api/attribution", {"text": TEXT, "token_id": 995})
    assert chosen["token_id"] == 995 and chosen["token"] == " world"
    assert chosen["logit"] == pytest.approx(float(logits[995]), abs=1e-4)
    assert sum(p["value"] for p in chosen["parts"]) + chosen["bias"] == pytest.approx(
        chosen["logit"], abs=1e-3
    )


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        ("/api/attention", {"text": "Hi", "layer": 2}, "layer", "layer must be < 2"),
        ("/api/attention", {"text": "Hi", "head": 4}, "head", "head must be < 4"),
        ("/api/attention", {"text": "Hi there", "position": 2}, "position", "position must be < 2"),
        ("/api/attention", {"text": "Hi", "position": -1}, "position", "greater than or equal to 0"),
        ("/api/attention/grid", {"text": "Hi", "layer": 5}, "layer", "layer must be < 2"),
        ("/api/attention/grid", {"text": "Hi"}, "layer", "layer is required"),
        ("/api/lens", {"text": "Hi", "position": 9}, "position", "position must be < 1"),
        ("/api/attribution", {"text": "Hi", "token_id": 50257}, "token_id", "token_id must be < 50257"),
        ("/api/attribution", {"text": "Hi", "token_id": "5"}, "token_id", "valid integer"),
        ("/api/surprise", {"text": ""}, "text", "at least 1 character"),
        ("/api/surprise", {"text": "word " * 140}, "text", "more than the context of 128"),
        ("/api/lens/grid", {"text": "word " * 140}, "text", "more than the context of 128"),
        ("/api/next", {"text": "Hi", "top_p": 0}, "top_p", "greater than 0"),
        ("/api/next", {"text": "Hi", "top_k": -1}, "top_k", "greater than or equal to 0"),
        ("/api/next", {"text": "Hi", "topk": 5}, "topk", "unknown field 'topk'"),
    ],
)
def test_explorer_errors_name_the_field(server, path, body, param, says) -> None:
    err = error(server, path, body)
    assert err["param"] == param and says in err["message"]


def test_explorer_page_and_assets(server) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "GPT-2 Explorer" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(f"{server.url}{asset}").status_code == 200


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op produced while active (views count as their size)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def largest(fn) -> int:
    with LargestTensor() as seen:
        fn()
    return seen.numel


def test_no_view_builds_more_than_a_forward_pass() -> None:
    """At the context limit, no view's biggest tensor exceeds the biggest of one plain forward
    pass, and a head's map never means every head's (or every layer's) maps at once."""
    T, V, nh, L = 256, 1024, 4, 4  # GPT-2's proportions: L * nh * T * T > T * V
    model = tiny_model(vocab_size=V, n_positions=T, n_layer=L, n_head=nh, n_embd=64)
    ids = torch.randint(0, V, (T,)).tolist()
    with torch.inference_mode():
        forward = largest(lambda: model(torch.tensor([ids])))
    assert forward == T * V  # the logits
    head = largest(lambda: explorer.attention_head(model, ids, layer=L - 1, head=1))
    assert head < nh * T * T and head <= forward
    assert (
        largest(lambda: explorer.attention_step(model, ids, layer=L - 1, head=1, position=T - 1)) <= forward
    )
    assert largest(lambda: direct_logit_attribution(model, ids)) <= forward
    assert largest(lambda: explorer.lens_grid(model, ids)) <= forward
    assert largest(lambda: explorer.surprise(model, ids, bos=0)) <= forward
    assert (
        largest(lambda: explorer.attention(model, ids[:64], layer=L - 1)) == nh * 64 * 64
    )  # the capped grid


def test_explorer_endpoints_in_the_openapi_schema(server) -> None:
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in ["next", "surprise", "attention", "attention/grid", "lens", "lens/grid", "attribution"]:
        responses = paths[f"/api/{path}"]["post"]["responses"]
        assert "400" in responses and "422" not in responses, path
