"""One rule each, in generation/prompts.py, for every entry point: the end-of-text id and left padding.

The model here disagrees with its tokenizer on purpose: its config's eos_token_id is 5, the
tokenizer's <|endoftext|> is 256. Wherever a tokenizer is known, the tokenizer's id wins.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from cli_helpers import run_main
from conftest import bytes_vocab, tiny_model
from gpt2kit import Tokenizer, complete, generate
from gpt2kit.evals.perplexity import evaluate_perplexity
from gpt2kit.evals.scoring import score_choices, score_continuations
from gpt2kit.generation.beam import beam_search
from gpt2kit.generation.prompts import eos_id, fit_prompt, left_pad, pad_id
from gpt2kit.model.checkpoint import save_model
from server_helpers import MODEL_NAME, running_server

CONFIG_EOS = 5
EOT = 256  # bytes_vocab puts <|endoftext|> after the 256 byte tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4, vocab_size=257, eos_token_id=CONFIG_EOS, bos_token_id=CONFIG_EOS)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(*bytes_vocab([]))


def without_endoftext(*, other_special: bool) -> Tokenizer:
    vocab, merges = bytes_vocab([], eot=False)
    if other_special:
        vocab["<|pad|>"] = len(vocab)
    return Tokenizer(vocab, merges)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, model, tok) -> Path:
    path = tmp_path_factory.mktemp("disagree")
    save_model(model, path, tokenizer=tok)
    return path


# --- the end-of-text id ------------------------------------------------------------------------


def test_eos_id_is_the_tokenizers_endoftext_else_the_configs(model, tok) -> None:
    assert eos_id(model, tok) == EOT
    assert eos_id(model) == CONFIG_EOS  # the id-level calls: generate, beam_search, scoring
    assert eos_id(model, without_endoftext(other_special=False)) == CONFIG_EOS
    # A tokenizer with special tokens but no <|endoftext|> (this raised TokenizerError before).
    assert eos_id(model, without_endoftext(other_special=True)) == CONFIG_EOS


def test_an_empty_prompt_starts_from_eos_id(model, tok) -> None:
    assert fit_prompt(model, [], 4, tokenizer=tok) == [EOT]
    assert fit_prompt(model, [], 4) == [CONFIG_EOS]
    greedy = {"max_new_tokens": 8, "temperature": 0}
    from_eot = generate(model, [[EOT]], eos_token_id=EOT, **greedy)[0][1:]
    assert from_eot != generate(model, [[CONFIG_EOS]], eos_token_id=EOT, **greedy)[0][1:], (
        "the two start ids must lead to different tokens, or this test shows nothing"
    )
    [c] = complete(model, tok, "", **greedy)
    assert c.token_ids == from_eot
    [c_ids] = complete(model, tok, [[]], **greedy)
    assert c_ids.token_ids == from_eot
    # generate has no tokenizer: the config's id.
    assert generate(model, [[]], eos_token_id=EOT, **greedy)[0][0] == CONFIG_EOS


def test_complete_stops_at_the_tokenizers_endoftext(model, tok) -> None:
    [c] = complete(model, tok, "a", max_new_tokens=8, temperature=0, logit_bias={EOT: 100})
    assert c.token_ids == [EOT] and c.finish_reason == "stop" and c.text == ""
    [c] = complete(model, tok, "a", max_new_tokens=3, temperature=0, logit_bias={CONFIG_EOS: 100})
    assert c.token_ids == [CONFIG_EOS] * 3 and c.finish_reason == "length"


@pytest.mark.parametrize("extra", [[], ["--num-beams", "2"], ["--n", "2", "--seed", "1"]])
def test_gpt2kit_generate_starts_an_empty_prompt_from_endoftext(
    model_dir: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    common = ["generate", "--model", str(model_dir), "--max-new-tokens", "6", "--temperature", "0"]
    code, empty, err = run_main(capsys, *common, "--prompt", "", *extra)
    assert code == 0, err
    code, explicit, err = run_main(capsys, *common, "--prompt", "<|endoftext|>", "--allow-special", *extra)
    assert code == 0, err
    assert empty.replace("<|endoftext|>", "") == explicit.replace("<|endoftext|>", "")


def test_the_server_and_the_explorer_use_the_same_id(model, tok, model_dir: Path) -> None:
    [c] = complete(model, tok, "", max_new_tokens=6, temperature=0)
    with running_server(model_dir) as s:
        body = {"model": MODEL_NAME, "prompt": "", "max_tokens": 6, "temperature": 0}
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == c.text
        r = httpx.post(f"{s.url}/api/next", json={"text": ""}, timeout=60)
        assert [t["id"] for t in r.json()["prompt_tokens"]] == [EOT]
        info = httpx.get(f"{s.url}/tokenizer_info", timeout=60).json()
        assert info["eos_token"] == "<|endoftext|>"


def test_evaluators_score_the_first_token_after_eos_id(model, tok) -> None:
    text = "abc"
    ids = tok.encode_ordinary(text)
    for tokenizer, start in [(tok, EOT), (without_endoftext(other_special=True), CONFIG_EOS)]:
        got = evaluate_perplexity(model, tokenizer, text)
        (want,) = score_continuations(model, [([start], ids)])
        assert got["total_nll_nats"] == pytest.approx(-want.logprob, rel=1e-6)
    # The id-level scorer has no tokenizer: an empty context starts from the config's id.
    (empty,) = score_continuations(model, [([], ids)])
    (explicit,) = score_continuations(model, [([CONFIG_EOS], ids)])
    assert empty.logprob == pytest.approx(explicit.logprob, abs=1e-6)


# --- left padding --------------------------------------------------------------------------------


def test_left_pad() -> None:
    ids, mask = left_pad([[1, 2, 3], [4]], 9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = left_pad([[1, 2], [3, 4]], 9)
    assert ids.tolist() == [[1, 2], [3, 4]] and mask is None
    assert left_pad([[1], [2, 3]], -1)[0].tolist() == [[0, 1], [2, 3]]  # eos -1 (never stop) pads 0
    assert pad_id(7) == 7 and pad_id(-1) == 0


def test_every_entry_point_reads_a_left_padded_batch_as_its_rows(model) -> None:
    prompts = [[10, 11, 12, 13], [20], [30, 31]]
    ids, mask = left_pad(prompts, CONFIG_EOS)
    greedy = {"max_new_tokens": 5, "temperature": 0, "eos_token_id": -1}
    # generate: a padded tensor gives each row what the row gets alone.
    out = generate(model, ids, attention_mask=mask, **greedy)
    for row, p in zip(out.tolist(), prompts, strict=True):
        assert row[ids.shape[1] :] == generate(model, [p], **greedy)[0][len(p) :]
    # beam search: likewise.
    beams = beam_search(model, ids, attention_mask=mask, max_new_tokens=4, num_beams=2, eos_token_id=-1)
    for row, p in zip(beams.tolist(), prompts, strict=True):
        alone = beam_search(model, torch.tensor([p]), max_new_tokens=4, num_beams=2, eos_token_id=-1)
        assert row[ids.shape[1] :] == alone[0, len(p) :].tolist()
    # scoring: contexts of different lengths share one left-padded pass.
    together = score_choices(model, prompts, [[[1, 2]]] * 3, batch_size=8)
    for p, [score] in zip(prompts, together, strict=True):
        (alone,) = score_continuations(model, [(p, [1, 2])])
        assert score.logprob == pytest.approx(alone.logprob, abs=1e-5)
