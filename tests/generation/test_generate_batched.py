"""Batched generation: lists of prompts of mixed lengths give what each prompt gives alone.

Also the rich text API (`complete`: n samples, stop strings, log-probabilities) and stop
strings in streamed text.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from conftest import scripted_model, tiny_model
from gpt2kit import Tokenizer, generate
from gpt2kit.errors import ConfigError
from gpt2kit.generation.complete import complete

PROMPTS = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [], [40, 41]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0),
        dict(temperature=0, repetition_penalty=1.5, no_repeat_ngram_size=2),
        dict(temperature=0.9, top_k=20, seed=11),
        dict(top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=4),
    ],
)
def test_batched_equals_one_by_one(model, options: dict) -> None:
    batched = generate(model, PROMPTS, max_new_tokens=12, **options)
    for i, p in enumerate(PROMPTS):
        alone_options = dict(options)
        if "seed" in options:
            alone_options["seed"] = options["seed"] + i  # the documented rule: row i uses seed + i
        alone = generate(model, [p], max_new_tokens=12, **alone_options)[0]
        assert batched[i] == alone, (i, options)
        assert batched[i][: len(p)] == p, "each result starts with its prompt"


def test_row_seeds_and_tensor_input_agree(model) -> None:
    a = generate(model, [[1, 2], [3, 4]], max_new_tokens=8, seed=7)
    b = generate(model, [[3, 4]], max_new_tokens=8, seed=8)
    assert a[1] == b[0], "row 1 samples with seed + 1"
    t = generate(model, torch.tensor([[1, 2], [3, 4]]), max_new_tokens=8, seed=7)
    assert t.tolist() == a  # tensor in -> tensor out, same tokens (no eos in 8 steps here)


def test_n_samples_per_prompt(model) -> None:
    out = generate(model, [[1, 2], [3]], max_new_tokens=6, n=3, seed=0)
    assert len(out) == 6
    assert out[3][:1] == [3] and out[0][:2] == [1, 2]
    # Copy j of prompt i is row i * n + j and samples with seed + row.
    assert out[4] == generate(model, [[3]], max_new_tokens=6, seed=4)[0]
    assert len({tuple(r) for r in out[:3]}) > 1, "the copies are different samples"


def test_finished_rows_are_dropped_and_others_continue(gpt2_tokenizer: Tokenizer) -> None:
    eot = gpt2_tokenizer.eot_token
    w = gpt2_tokenizer.encode(" a b c d e f")
    # Greedy after position p is script[p]: a row whose last prompt token sits at position 0
    # ends at once (script[1] = eot after one token); longer prompts run on.
    script = [w[1], eot, w[2], w[3], w[4], w[5], w[0], w[1], w[2], w[3]]
    model = scripted_model(script)
    prompts = [[w[0]], [w[0]], [w[0]], [w[0], w[1], w[2]]]
    batch_sizes: list[int] = []
    step = model.decode_step

    def counting_step(idx, *args):  # observe the engine's decode steps
        batch_sizes.append(idx.shape[0])
        return step(idx, *args)

    model.decode_step = counting_step  # type: ignore[method-assign]
    try:
        out = generate(model, prompts, max_new_tokens=6, temperature=0)
    finally:
        del model.decode_step
    assert batch_sizes == [4, 1, 1, 1, 1], "three rows ended after two tokens, then only one ran"
    for i, p in enumerate(prompts):
        assert out[i] == generate(model, [p], max_new_tokens=6, temperature=0)[0]
    assert out[0] == [w[0], w[1], eot], "ends at its <|endoftext|> (included), no padding"
    assert out[3] == [w[0], w[1], w[2], *script[2:8]]


def test_bad_list_inputs(model) -> None:
    with pytest.raises(ConfigError, match="list of integer token ids"):
        generate(model, ["hello"], max_new_tokens=2)
    with pytest.raises(ConfigError, match="non-empty list"):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(ConfigError, match="n must be"):
        generate(model, [[1]], max_new_tokens=2, n=0)


def test_complete_stop_strings_never_leak(gpt2_tokenizer: Tokenizer) -> None:
    tok = gpt2_tokenizer
    text = "Q: first\nA: yes\n\nQ: second"
    ids = tok.encode(text)
    model = scripted_model([*ids[1:], ids[-1], ids[-1]])
    prompt = tok.decode(ids[:2])
    [c] = complete(model, tok, prompt, max_new_tokens=40, temperature=0, stop=["\n\n"])
    rest = text[len(prompt) :]
    assert c.text == rest[: rest.index("\n\n")]
    assert c.finish_reason == "stop"
    chunks = list(complete(model, tok, prompt, max_new_tokens=40, temperature=0, stop=["\n\n"], stream=True))
    pieces = [ch.text for ch in chunks if ch.text]
    assert "".join(pieces) == c.text
    assert chunks[-1].finish_reason == "stop"
    assert sum(len(ch.token_ids) for ch in chunks) == len(c.token_ids)
    assert not any(p.endswith("\n") for p in pieces[-1:]), "no part of the stop string is streamed"
    # Without a stop string the same run goes to the length limit.
    [c2] = complete(model, tok, prompt, max_new_tokens=5, temperature=0)
    assert c2.finish_reason == "length" and len(c2.token_ids) == 5


def test_complete_logprobs_and_n(model) -> None:
    class Tok:  # the tiny model's vocabulary is 97 bytes-as-tokens, enough for this check
        special_tokens: ClassVar[dict[str, int]] = {"<|endoftext|>": 96}
        eot_token = 96

        def encode(self, s: str, **options) -> list[int]:
            return [b % 96 for b in s.encode()]

        def decode_bytes(self, ids: list[int]) -> bytes:
            return bytes(32 + i for i in ids)

    out = complete(model, Tok(), ["ab", "c"], max_new_tokens=5, n=2, seed=1, logprobs=3)
    assert [c.prompt_index for c in out] == [0, 0, 1, 1]
    ids = generate(model, [Tok().encode("ab"), Tok().encode("c")], max_new_tokens=5, n=2, seed=1)
    for c, row in zip(out, ids, strict=True):
        assert c.token_ids == row[len(row) - len(c.token_ids) :]
        # Each log-prob is the model's own log-softmax at that step, checked by recomputing.
        prompt = row[: len(row) - len(c.token_ids)]
        with torch.no_grad():
            logp = model(torch.tensor([row])).logits[0].log_softmax(-1)
        for t, (tid, lp, top) in enumerate(zip(c.token_ids, c.token_logprobs, c.top_logprobs, strict=True)):
            pos = len(prompt) - 1 + t
            assert lp == pytest.approx(logp[pos, tid].item(), abs=1e-4)
            assert len(top) == 3 and max(top.values()) == pytest.approx(logp[pos].max().item(), abs=1e-4)


@pytest.mark.gpu
def test_cuda_batched_greedy_matches_cpu(model) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    gpu = generate(tiny_model(seed=3).cuda(), PROMPTS, max_new_tokens=12, temperature=0)
    assert gpu == cpu
