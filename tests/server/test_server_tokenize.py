"""vLLM's tokenizer endpoints (/tokenizer_info, /tokenize, /detokenize), checked against
transformers' GPT-2 tokenizer and driven by lm-eval's own remote tokenizer client."""

from __future__ import annotations

import httpx
import pytest

from server_helpers import MODEL_NAME, check_error, make_model_dir, running_server

N_CTX = 96
TEXTS = [
    "Hello world",
    " leading space, trailing space ",
    "naïve café — 東京 🙂",
    "two<|endoftext|>documents",
    "line one\nline two\r\n\ttabbed",
    "",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tokenize"), n_positions=N_CTX)


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir)


def test_tokenizer_info(server) -> None:
    r = httpx.get(f"{server.url}/tokenizer_info")
    assert r.status_code == 200
    info = r.json()
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    assert info["pad_token"] is None  # GPT-2 has none
    assert info["model_max_length"] == N_CTX
    assert info["tokenizer_class"] == "GPT2Tokenizer"
    assert "chat_template" not in info  # optional, and GPT-2 has none


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_matches_transformers(server, hf_tokenizer, text) -> None:
    for special in (False, True):
        r = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": special})
        assert r.status_code == 200, r.text
        out = r.json()
        expected = hf_tokenizer(text, add_special_tokens=special)["input_ids"]
        assert out["tokens"] == expected
        assert out["count"] == len(expected)
        assert out["max_model_len"] == N_CTX
        assert out["token_strs"] is None


def test_tokenize_token_strs_and_model(server, hf_tokenizer) -> None:
    r = httpx.post(
        f"{server.url}/tokenize",
        json={"model": MODEL_NAME, "prompt": "Hello world", "return_token_strs": True},
    )
    assert r.json()["tokens"] == [15496, 995]
    assert r.json()["token_strs"] == ["Hello", " world"]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenize_round_trips(server, hf_tokenizer, text) -> None:
    ids = hf_tokenizer(text)["input_ids"]
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": text}
    assert r.json()["prompt"] == hf_tokenizer.decode(ids)


def test_detokenize_cut_character(server, hf_tokenizer) -> None:
    ids = hf_tokenizer("🙂")["input_ids"]
    assert len(ids) > 1
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": ids[:1]})
    assert r.json()["prompt"] == hf_tokenizer.decode(ids[:1]) == "\ufffd"


@pytest.mark.parametrize(
    ("path", "payload", "status", "param"),
    [
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": ["a", "b"]}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, 400, "add_special_tokens"),
        ("/tokenize", {"prompt": "x", "messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ("/detokenize", {}, 400, "tokens"),
        ("/detokenize", {"tokens": "15496"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1.5]}, 400, "tokens"),
        ("/detokenize", {"tokens": [True]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [50257]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_requests(server, path, payload, status, param) -> None:
    check_error(httpx.post(f"{server.url}{path}", json=payload), status, param)


def test_wrong_methods(server) -> None:
    check_error(httpx.get(f"{server.url}/tokenize"), 405, None)
    check_error(httpx.post(f"{server.url}/tokenizer_info", json={}), 405, None)


def test_api_key_protects_them(model_dir) -> None:
    with running_server(model_dir, api_key="s3cret") as s:
        calls = [
            ("GET", "/tokenizer_info", None),
            ("POST", "/tokenize", {"prompt": "x"}),
            ("POST", "/detokenize", {"tokens": [87]}),
        ]
        for method, path, payload in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = httpx.request(method, f"{s.url}{path}", json=payload, headers=headers)
                check_error(r, 401, None)
            good = {"Authorization": "Bearer s3cret"}
            assert httpx.request(method, f"{s.url}{path}", json=payload, headers=good).status_code == 200


def test_lm_eval_remote_tokenizer(server, hf_tokenizer) -> None:
    """lm-eval's own client: what `local-completions` with tokenizer_backend=remote calls."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    base_url = f"{server.url}/v1/completions"
    assert check_remote_tokenizer_support(base_url)
    tok = RemoteTokenizer(base_url, timeout=30)
    assert tok.eos_token_id == tok.bos_token_id == hf_tokenizer.eos_token_id == 50256
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == text
    assert tok.batch_decode([[15496], [995]]) == ["Hello", " world"]
