"""Every entry point gives the same tokens for the same SamplingConfig: `generate`, `complete`
(whole and streamed), `gpt2kit generate` and `gpt2kit serve`, greedy and seeded sampling with
filters and penalties, prompts of mixed lengths, and requests that join a running batch."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from cli_helpers import run_main
from gpt2kit import complete, generate
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.model import GPT2
from gpt2kit.model.checkpoint import load_tokenizer
from server_helpers import MODEL_NAME, make_model_dir, running_server

PROMPTS = ["Hello world, this is", "Once", "The quick brown fox jumps over the lazy"]
CONFIGS = {
    "greedy": SamplingConfig(max_new_tokens=12, temperature=0),
    "topk-topp": SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, n=2, seed=3),
    "penalties": SamplingConfig(
        max_new_tokens=12,
        temperature=1.1,
        min_p=0.01,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.4,
        logit_bias={"13": 3.0},
        n=2,
        seed=11,
    ),
    "no-repeat": SamplingConfig(max_new_tokens=12, temperature=0.8, no_repeat_ngram_size=2, seed=5),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("entry"), n_positions=128)


@pytest.fixture(scope="module")
def pair(model_dir: Path):
    return GPT2.from_pretrained(model_dir), load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def server(model_dir: Path):
    with running_server(model_dir) as s:
        yield s


def wire(config: SamplingConfig, prompt: object) -> dict:
    """The same request as the server's JSON body."""
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "n": config.n,
        "presence_penalty": config.presence_penalty,
        "frequency_penalty": config.frequency_penalty,
    }
    if config.top_k:
        body["top_k"] = config.top_k
    if config.min_p:
        body["min_p"] = config.min_p
    if config.repetition_penalty != 1.0:
        body["repetition_penalty"] = config.repetition_penalty
    if config.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in config.logit_bias.items()}
    if config.seed is not None:
        body["seed"] = config.seed
    return body


@pytest.mark.parametrize("name", list(CONFIGS))
def test_library_entry_points_agree(pair, name: str) -> None:
    model, tok = pair
    config = CONFIGS[name]
    done = complete(model, tok, PROMPTS, config)
    streamed = [""] * len(done)
    for chunk in complete(model, tok, PROMPTS, config, stream=True):
        streamed[chunk.index] += chunk.text
    assert streamed == [c.text for c in done]
    ids = [tok.encode(p) for p in PROMPTS]
    rows = generate(model, ids, config, eos_token_id=tok.eot_token)
    for r, (c, row) in enumerate(zip(done, rows, strict=True)):
        assert c.token_ids == row[len(ids[r // config.n]) :], (name, r)
        assert c.prompt_index == r // config.n


@pytest.mark.parametrize(
    "name", ["greedy", "topk-topp", "penalties"]
)  # no_repeat_ngram_size isn't a wire field
def test_server_equals_complete(pair, server, name: str) -> None:
    model, tok = pair
    config = CONFIGS[name]
    r = httpx.post(f"{server.url}/v1/completions", json=wire(config, PROMPTS), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    done = complete(model, tok, PROMPTS, config, allowed_special="all")
    assert [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])] == [c.text for c in done]
    eot = tok.eot_token
    assert body["usage"]["completion_tokens"] == sum(len([t for t in c.token_ids if t != eot]) for c in done)


@pytest.mark.parametrize("name", ["greedy", "topk-topp", "penalties"])
def test_cli_equals_complete(pair, model_dir: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    model, tok = pair
    config = CONFIGS[name]
    args = [
        "generate", "--model", str(model_dir), "--prompt", PROMPTS[2], "--dtype", "float32",
        "--max-new-tokens", str(config.max_new_tokens), "--temperature", str(config.temperature),
        "--top-p", str(config.top_p), "--presence-penalty", str(config.presence_penalty),
        "--frequency-penalty", str(config.frequency_penalty), "--n", str(config.n),
    ]  # fmt: skip
    if config.top_k:
        args += ["--top-k", str(config.top_k)]
    if config.min_p:
        args += ["--min-p", str(config.min_p)]
    if config.repetition_penalty != 1.0:
        args += ["--repetition-penalty", str(config.repetition_penalty)]
    for token, bias in config.logit_bias.items():
        args += ["--logit-bias", f"{token}={bias}"]
    if config.seed is not None:
        # Prompt 2's first row in a three-prompt request samples with seed + 2 * n.
        args += ["--seed", str(config.seed + 2 * config.n)]
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    done = complete(model, tok, PROMPTS, config)[2 * config.n :]
    if config.n == 1:
        assert out == PROMPTS[2] + done[0].text + "\n"
    else:
        samples = out.split("--- sample ")[1:]
        assert [s.split("---\n", 1)[1] for s in samples] == [PROMPTS[2] + c.text + "\n" for c in done]


def test_requests_joining_a_running_batch_get_what_they_get_alone(pair, server) -> None:
    model, tok = pair
    long = SamplingConfig(max_new_tokens=100, temperature=0.9, seed=1, logit_bias={"50256": -100})
    short = SamplingConfig(max_new_tokens=20, top_k=20, seed=2)
    results: dict[str, str] = {}

    def stream_long() -> None:
        text = ""
        body = {**wire(long, PROMPTS[0]), "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if "started" not in results:
                        results["started"] = ""
                        started.set()
        results["long"] = text

    started = threading.Event()
    thread = threading.Thread(target=stream_long)
    thread.start()
    assert started.wait(30)
    r = httpx.post(f"{server.url}/v1/completions", json=wire(short, PROMPTS[1]), timeout=60)
    thread.join(60)
    assert r.json()["choices"][0]["text"] == complete(model, tok, PROMPTS[1], short)[0].text
    assert results["long"] == complete(model, tok, PROMPTS[0], long)[0].text


def test_usage_counts_tokens_up_to_the_stop_string(pair, server) -> None:
    """Two choices of 20 tokens, one ended early by a stop string: usage counts the tokens the
    text came from (up to the one completing the stop string), not 40."""
    model, tok = pair
    config = SamplingConfig(max_new_tokens=20, temperature=0, logit_bias={"50256": -100})
    first, second = complete(model, tok, PROMPTS[:2], config)
    # A stop string from the middle of the first choice's text that the second never produces.
    stop = next(
        first.text[i : i + 3]
        for i in range(2, len(first.text) - 3)
        if first.text[i : i + 3] not in second.text and first.text[i : i + 3] not in first.text[:i]
    )
    done = complete(model, tok, PROMPTS[:2], config.replace(stop=stop))
    assert done[0].finish_reason == "stop" and len(done[0].token_ids) < 20
    assert done[1].finish_reason == "length" and len(done[1].token_ids) == 20
    body = {**wire(config, PROMPTS[:2]), "stop": stop}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == len(done[0].token_ids) + 20 < 40
    assert [c["text"] for c in r.json()["choices"]] == [c.text for c in done]
