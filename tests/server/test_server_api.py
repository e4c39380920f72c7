"""/v1/completions against a real uvicorn server, through the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest
import torch

from gpt2kit.model import GPT2
from gpt2kit.model.checkpoint import load_tokenizer
from server_helpers import MODEL_NAME, make_model_dir, running_server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(model_dir):
    return GPT2.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def test_plain_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=7, seed=1)
    assert r.object == "text_completion" and r.model == MODEL_NAME and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == 2
    assert r.usage.total_tokens == 2 + r.usage.completion_tokens
    again = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=7, seed=1)
    assert again.choices[0].text == r.choices[0].text


def test_greedy_text_is_the_models(client: openai.OpenAI, model, tokenizer) -> None:
    from gpt2kit.generation.generate import generate

    r = client.completions.create(model=MODEL_NAME, prompt="The cat sat", max_tokens=10, temperature=0)
    ids = tokenizer.encode("The cat sat")
    out = generate(model, torch.tensor([ids]), max_new_tokens=10, temperature=0)[0, len(ids) :].tolist()
    if 50256 in out:
        out = out[: out.index(50256)]
    assert r.choices[0].text == tokenizer.decode(out)


def test_streaming_equals_plain(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12, seed=4, temperature=0.9)
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_ends_with_done_and_usage(server) -> None:
    body = {
        "model": MODEL_NAME,
        "prompt": "Hi",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    usage = json.loads(events[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 1


def test_n_choices(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="A", max_tokens=6, n=3, seed=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1
    # Choice i samples with seed + i.
    single = client.completions.create(model=MODEL_NAME, prompt="A", max_tokens=6, seed=3)
    assert r.choices[1].text == single.choices[0].text
    streamed = list(
        client.completions.create(model=MODEL_NAME, prompt="A", max_tokens=6, n=3, seed=2, stream=True)
    )
    texts = ["".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(3)]
    assert texts == [c.text for c in r.choices]


def test_several_prompts_and_token_ids(client: openai.OpenAI, tokenizer) -> None:
    ids = tokenizer.encode("Hello world")
    r = client.completions.create(
        model=MODEL_NAME, prompt=["Hello world", "Bye"], max_tokens=4, temperature=0
    )
    assert len(r.choices) == 2
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    lists = client.completions.create(model=MODEL_NAME, prompt=[ids, [33]], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in lists.choices] == [0, 1, 2, 3]
    assert lists.choices[0].text == lists.choices[1].text == r.choices[0].text


def test_stop_strings(client: openai.OpenAI) -> None:
    full = (
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=20, temperature=0).choices[0].text
    )
    assert len(full) > 6
    stop = full[3:6]
    r = client.completions.create(
        model=MODEL_NAME, prompt="x", max_tokens=20, temperature=0, stop=[stop, "@@@"]
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL_NAME, prompt="x", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI, model, tokenizer) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0
        assert len(top) == 3 and top[token] == pytest.approx(max(top.values()))  # greedy: the top one
    ids = tokenizer.encode("Hello")
    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    assert lp.token_logprobs[0] == pytest.approx(float(first.max()), abs=1e-4)


def test_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="Echo me", max_tokens=3, echo=True, seed=0)
    plain = client.completions.create(model=MODEL_NAME, prompt="Echo me", max_tokens=3, seed=0)
    assert r.choices[0].text == "Echo me" + plain.choices[0].text


def test_scoring_request_matches_the_model(client: openai.OpenAI, model, tokenizer) -> None:
    """lm-evaluation-harness's loglikelihood request: echo, max_tokens 0, logprobs."""
    text = "The quick brown fox jumps over the lazy dog"
    r = client.completions.create(
        model=MODEL_NAME, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = r.choices[0].logprobs
    ids = tokenizer.encode(text)
    assert r.choices[0].text == text
    assert lp.tokens == tokenizer.decode_tokens(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    expected = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    # top_logprobs holds the most likely token (and the actual one, as OpenAI's does).
    for i in range(1, len(ids)):
        best = tokenizer.decode_tokens([int(ref[i - 1].argmax())])[0]
        assert lp.top_logprobs[i][best] == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    assert r.usage.completion_tokens == 0


def test_scoring_token_id_prompt(client: openai.OpenAI, tokenizer) -> None:
    ids = tokenizer.encode("Token ids in, logprobs out")
    r = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert len(r.choices[0].logprobs.token_logprobs) == len(ids)


def test_concurrent_requests_equal_sequential(client: openai.OpenAI) -> None:
    prompts = ["One", "Two words", "Three words here", "A much longer prompt than the rest of them", "5"]
    kw = dict(model=MODEL_NAME, max_tokens=10, temperature=1.0)
    sequential = [
        client.completions.create(prompt=p, seed=i, **kw).choices[0].text for i, p in enumerate(prompts)
    ]
    with concurrent.futures.ThreadPoolExecutor(len(prompts) * 2) as pool:
        futures = [
            pool.submit(client.completions.create, prompt=p, seed=i, **kw) for i, p in enumerate(prompts)
        ]
        futures += [
            pool.submit(
                lambda p=p, i=i: "".join(
                    c.choices[0].text for c in client.completions.create(prompt=p, seed=i, stream=True, **kw)
                )
            )
            for i, p in enumerate(prompts)
        ]
        results = [f.result() for f in futures]
    assert [r.choices[0].text for r in results[: len(prompts)]] == sequential
    assert results[len(prompts) :] == sequential


def test_models_and_health(client: openai.OpenAI, server) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME and health["auth_required"] is False


def test_openapi_schema_is_accurate(server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    paths = schema["paths"]
    for path in ["/v1/completions", "/v1/models", "/health", "/api/next", "/api/attention", "/api/lens"]:
        assert path in paths
    request = schema["components"]["schemas"]["CompletionRequest"]
    assert request["additionalProperties"] is False
    assert set(request["required"]) == {"model", "prompt"}
    props = request["properties"]
    assert props["top_p"]["exclusiveMinimum"] == 0 and props["temperature"]["maximum"] == 2
    assert list(props)[:3] == ["model", "prompt", "best_of"]
    responses = paths["/v1/completions"]["post"]["responses"]
    assert "422" not in responses and "400" in responses and "429" in responses
    assert "text/event-stream" in responses["200"]["content"]


def test_client_disconnect_cancels_generation(server) -> None:
    body = {"model": MODEL_NAME, "prompt": "Go", "max_tokens": 500, "stream": True, "seed": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # The engine notices at its next step boundary; the request leaves the engine.
    deadline = time.monotonic() + 10
    while server.worker.load and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.worker.load == 0


def test_api_key(model_dir) -> None:
    with running_server(model_dir, api_key="s3cret") as s:
        body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(f"{s.url}/v1/completions", json=body, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
        assert httpx.post(f"{s.url}/api/next", json={"text": "x"}).status_code == 401
        assert httpx.get(f"{s.url}/health").json()["auth_required"] is True
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1).choices
        bad = openai.OpenAI(base_url=f"{s.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1)
