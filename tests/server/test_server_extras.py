"""vLLM's request extras and the end-of-text policy on /v1/completions, through the real
`openai` client (`extra_body`) against a real server on loopback.

The model is scripted (conftest.scripted_model): greedy from "Hello" it writes
" world!", <|endoftext|>, " Bye now. See you", so every rule is checked on known tokens.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import scripted_model
from gpt2kit.generation.complete import complete
from gpt2kit.model.checkpoint import save_model
from gpt2kit.tokenizer.tokenizer import Tokenizer
from server_helpers import MODEL_NAME, check_error, running_server

EOT = 50256
WORLD = [995, 0]  # " world", "!"
BYE = [47843, 783, 13, 4091, 345]  # " Bye", " now", ".", " See", " you"
SCRIPT = [*WORLD, EOT, *BYE, *BYE]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def model():
    return scripted_model(SCRIPT)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("scripted")
    save_model(model, path, tokenizer=tokenizer)
    with running_server(path) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def create(client: openai.OpenAI, *, max_tokens: int = 8, stream: bool = False, **extra):
    """One greedy completion of "Hello"; vLLM's fields go in `extra_body`, as users send them."""
    known = {k: extra.pop(k) for k in ("stop", "logprobs") if k in extra}
    kw = dict(model=MODEL_NAME, prompt="Hello", max_tokens=max_tokens, temperature=0, **known)
    if stream:
        chunks = list(client.completions.create(**kw, stream=True, extra_body=extra))
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    return client.completions.create(**kw, extra_body=extra)


def test_the_eot_token_counts_and_has_a_logprob_but_no_text(client, model, tokenizer) -> None:
    r = create(client, logprobs=1)
    c = r.choices[0]
    assert (c.text, c.finish_reason) == (" world!", "stop")
    assert r.usage.completion_tokens == 3, "the <|endoftext|> that ended it is one of its tokens"
    assert c.logprobs.tokens == [" world", "!", "<|endoftext|>"]
    assert c.logprobs.text_offset == [0, 6, 7], "the eot starts where the text ends"
    assert all(lp is not None and lp <= 0 for lp in c.logprobs.token_logprobs)
    # The library follows the same policy, token for token.
    (done,) = complete(model, tokenizer, "Hello", max_new_tokens=8, temperature=0, logprobs=0)
    assert (done.text, done.token_ids, done.finish_reason) == (" world!", [*WORLD, EOT], "stop")
    assert done.token_logprobs == pytest.approx(c.logprobs.token_logprobs, abs=1e-5)


def test_skip_special_tokens_false_writes_the_eot(client) -> None:
    r = create(client, skip_special_tokens=False)
    assert r.choices[0].text == " world!<|endoftext|>"
    assert create(client, skip_special_tokens=False, stream=True) == (" world!<|endoftext|>", "stop")


def test_ignore_eos_keeps_going(client) -> None:
    r = create(client, max_tokens=6, ignore_eos=True)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (" world! Bye now.", "length")
    assert r.usage.completion_tokens == 6
    shown = create(client, max_tokens=6, ignore_eos=True, skip_special_tokens=False, stream=True)
    assert shown == (" world!<|endoftext|> Bye now.", "length")


@pytest.mark.parametrize(
    "spaces", [True, False], ids=["spaces_between_special_tokens", "no_spaces_between_special_tokens"]
)
def test_spaces_between_special_tokens_inserts_nothing_in_a_byte_level_bpe(
    client, tmp_path, tokenizer, spaces: bool
) -> None:
    r = create(
        client, max_tokens=5, ignore_eos=True, skip_special_tokens=False, spaces_between_special_tokens=spaces
    )
    assert r.choices[0].text == " world!<|endoftext|> Bye now"
    # As transformers decodes GPT-2 (what vLLM's detokenizer follows).
    from transformers import GPT2Tokenizer

    tokenizer.save(tmp_path)
    hf = GPT2Tokenizer.from_pretrained(tmp_path)
    ids = [*WORLD, EOT, *BYE[:2]]
    assert (
        hf.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=spaces) == r.choices[0].text
    )


def test_include_stop_str_in_output(client) -> None:
    assert create(client, stop=["!"]).choices[0].text == " world"
    for stream in (False, True):
        got = create(client, stop=["!", "zz"], include_stop_str_in_output=True, stream=stream)
        text = got if stream else (got.choices[0].text, got.choices[0].finish_reason)
        assert text == (" world!", "stop")


def test_min_tokens_holds_off_eos_and_stop_strings(client) -> None:
    # A stop string in the first min_tokens tokens' text doesn't count.
    assert create(client, stop=[" world"]).choices[0].text == ""
    r = create(client, stop=[" world"], min_tokens=1)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (" world!", "stop")
    # The eos is never drawn before min_tokens tokens.
    r = create(client, max_tokens=6, min_tokens=3, logprobs=1)
    assert r.choices[0].logprobs.tokens[2] != "<|endoftext|>"
    assert r.usage.completion_tokens >= 3
    streamed = create(client, max_tokens=6, min_tokens=3, stream=True)
    assert streamed == (r.choices[0].text, r.choices[0].finish_reason)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 1.5}, "min_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
        ({"include_stop_str_in_output": "true"}, "include_stop_str_in_output"),
        ({"spaces_between_special_tokens": 0}, "spaces_between_special_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"50257": 1}}, "logit_bias"),
        ({"prompt": [50257]}, "prompt"),
        ({"best_of_n": 2}, "best_of_n"),
    ],
)
def test_strict_validation(server, extra: dict, param: str) -> None:
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **extra}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    check_error(r, 400, param)


def test_validation_messages_name_the_fix(server) -> None:
    def message(**extra) -> str:
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **extra}
        return httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["error"]["message"]

    assert message(min_tokens=9) == "min_tokens must be an integer in [0, max_tokens=4], got 9"
    assert message(stop="") == "stop '' would stop before the first token; give the text to stop before"
    assert message(stop=list("abcde")) == "stop: must be a string or a list of at most 4 strings"
    assert message(best_of_n=2).startswith("unknown field 'best_of_n'")
