"""Generation: greedy equals transformers', the KV cache changes nothing, seeds reproduce."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import scripted_model, tiny_model
from gpt2kit import GPT2, Tokenizer, generate
from gpt2kit.errors import ConfigError
from gpt2kit.generation.complete import complete
from gpt2kit.generation.config import SamplingConfig, row_generator, uniforms
from gpt2kit.generation.processors import History, next_tokens

PROMPT = "Hello world, this is a test of"


@pytest.fixture(scope="module")
def pair(tiny_hf_dir: Path):
    """(ours, transformers') loaded from the same tiny GPT-2 directory (real 50257 vocabulary)."""
    from transformers import AutoModelForCausalLM

    return GPT2.from_pretrained(tiny_hf_dir), AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()


def naive_generate(
    model: GPT2, ids: torch.Tensor, n: int, *, seed: int | None = None, **options
) -> torch.Tensor:
    """The definition of autoregressive decoding: recompute every logit at every step, no cache;
    row r draws from its own generator seeded with seed + r, one uniform number per step."""
    config = SamplingConfig(**options)
    generators = [row_generator(None if seed is None else seed + r, "cpu") for r in range(ids.shape[0])]
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[:, -1]
            token = next_tokens(logits, config, History(), uniforms(generators, "cpu"))
            ids = torch.cat([ids, token[:, None]], dim=1)
    return ids


def test_greedy_matches_transformers(pair, gpt2_tokenizer: Tokenizer) -> None:
    ours, ref = pair
    ids = torch.tensor([gpt2_tokenizer.encode(PROMPT)])
    got = generate(ours, ids, max_new_tokens=64, temperature=0, eos_token_id=-1)
    with torch.no_grad():
        want = ref.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=64,
            pad_token_id=50256,
        )
    assert want.shape == (1, ids.shape[1] + 64), "transformers stopped early; pick another prompt"
    assert got.tolist() == want.tolist()


def test_greedy_batch_matches_transformers(pair, gpt2_tokenizer: Tokenizer) -> None:
    ours, ref = pair
    prompts = [PROMPT, "Once", "The quick brown fox jumps"]
    rows = [gpt2_tokenizer.encode(p) for p in prompts]
    T = max(map(len, rows))
    ids = torch.tensor([[50256] * (T - len(r)) + r for r in rows])  # left-padded, as transformers wants
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=24, temperature=0, eos_token_id=-1)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=50256)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0),
        dict(temperature=1.0, seed=3),
        dict(temperature=0.7, top_k=20, seed=4),
        dict(temperature=1.3, top_p=0.8, seed=5),
        dict(temperature=0.9, top_k=50, top_p=0.95, seed=6),
    ],
    ids=["greedy", "t1", "topk", "topp", "both"],
)
def test_cached_decoding_equals_recomputing(options: dict) -> None:
    model = tiny_model(seed=8)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    got = generate(model, ids, max_new_tokens=24, eos_token_id=-1, **options)
    seed = options.pop("seed", None)
    want = naive_generate(model, ids, 24, seed=seed, **options)
    assert got.tolist() == want.tolist()


def test_same_seed_same_sample_other_seed_other_sample() -> None:
    model = tiny_model(seed=9)
    ids = torch.tensor([[1, 2, 3]])
    a = generate(model, ids, max_new_tokens=32, seed=123, eos_token_id=-1)
    b = generate(model, ids, max_new_tokens=32, seed=123, eos_token_id=-1)
    c = generate(model, ids, max_new_tokens=32, seed=124, eos_token_id=-1)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert a[:, :3].tolist() == ids.tolist(), "the prompt comes first, as in transformers"
    # Without a seed, two samples differ (fresh randomness).
    d = generate(model, ids, max_new_tokens=32, eos_token_id=-1)
    e = generate(model, ids, max_new_tokens=32, eos_token_id=-1)
    assert d.tolist() != e.tolist()


def test_batch_rows_equal_rows_alone() -> None:
    model = tiny_model(seed=10)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (9, 4, 1, 6)]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    for options in (dict(temperature=0), dict(temperature=1.0, top_k=30)):
        seed = 11 if options["temperature"] else None
        batch = generate(
            model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=-1, seed=seed, **options
        )
        for i, row in enumerate(rows):
            alone = generate(
                model,
                torch.tensor([row]),
                max_new_tokens=20,
                eos_token_id=-1,
                seed=seed + i if seed is not None else None,  # row i of a batch samples with seed + i
                **options,
            )
            assert batch[i, T:].tolist() == alone[0, len(row) :].tolist(), f"row {i} with {options}"


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        (dict(temperature=-0.1), "temperature must be a number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a number >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=-1.0), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(top_kk=3), "top_kk is not a sampling option"),
        (dict(stop="x"), "use complete"),
    ],
)
def test_bad_sampling_options(options: dict, flag: str) -> None:
    """Errors name the SamplingConfig field (the CLI and server translate them)."""
    model = tiny_model()
    options = {"max_new_tokens": 4, **options}
    with pytest.raises(ConfigError, match=flag):
        generate(model, torch.tensor([[1, 2]]), **options)


def test_bad_inputs() -> None:
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"\[batch, T\]"):
        generate(model, torch.tensor([1, 2]), max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"\[0, 97\)"):
        generate(model, torch.tensor([[1, 97]]), max_new_tokens=2)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        generate(model, torch.tensor([[1], [2]]), max_new_tokens=2, seed=[1, 2])


def test_top_p_one_and_top_k_one() -> None:
    model = tiny_model(seed=12)
    ids = torch.tensor([[5, 6, 7]])
    greedy = generate(model, ids, max_new_tokens=16, temperature=0, eos_token_id=-1)
    assert (
        generate(model, ids, max_new_tokens=16, top_k=1, seed=0, eos_token_id=-1).tolist() == greedy.tolist()
    )
    plain = generate(model, ids, max_new_tokens=16, seed=7, eos_token_id=-1)
    assert (
        generate(model, ids, max_new_tokens=16, top_p=1.0, seed=7, eos_token_id=-1).tolist() == plain.tolist()
    )


def test_empty_prompt_starts_from_endoftext() -> None:
    model = tiny_model(seed=13)
    eot = model.config.eos_token_id
    out = generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=8, seed=1, eos_token_id=-1)
    assert out.shape == (1, 9) and out[0, 0] == eot
    same = generate(model, torch.tensor([[eot]]), max_new_tokens=8, seed=1, eos_token_id=-1)
    assert out.tolist() == same.tolist()


def test_long_prompt_is_cut_from_the_left(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model(seed=14, n_positions=16)
    ids = torch.randint(0, 96, (1, 40))
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        out = generate(model, ids, max_new_tokens=5, temperature=0, eos_token_id=-1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "prompt has 40 tokens; keeping the last 15" in warnings[0]
    assert out.shape == (1, 16), "stops at the context limit"
    assert out[0, :15].tolist() == ids[0, -15:].tolist()
    want = generate(model, ids[:, -15:], max_new_tokens=1, temperature=0, eos_token_id=-1)
    assert out.tolist() == want.tolist()


def test_stops_at_the_context_limit() -> None:
    model = tiny_model(seed=15, n_positions=32)
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=1000, eos_token_id=-1, seed=0)
    assert out.shape == (1, 32)
    assert generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=0).tolist() == [[1, 2, 3]]


def test_stops_at_endoftext(gpt2_tokenizer: Tokenizer) -> None:
    eot = gpt2_tokenizer.eot_token
    w0, w1, w2 = gpt2_tokenizer.encode(" one two three")
    # After position p the model says script[p]: from the prompt [w0] it says w1 w2 eot.
    model = scripted_model([w1, w2, eot, w0, w1, w2, w0, w1])
    out = generate(model, torch.tensor([[w0]]), max_new_tokens=20, temperature=0)
    assert out.tolist() == [[w0, w1, w2, eot]], "stops right after <|endoftext|>"
    # eos_token_id=-1 never stops early.
    out = generate(model, torch.tensor([[w0]]), max_new_tokens=5, temperature=0, eos_token_id=-1)
    assert out.tolist() == [[w0, w1, w2, eot, w0, w1]]
    # In a batch, a row that ended gets <|endoftext|> while the others continue; all done = stop.
    ids = torch.tensor([[eot, w0], [w0, w1]])
    mask = torch.tensor([[0, 1], [1, 1]])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=20, temperature=0)
    assert out[:, 2:].tolist() == [[w1, w2, eot], [w2, eot, eot]]


def test_scripted_model_follows_its_script(gpt2_tokenizer: Tokenizer) -> None:
    ids = gpt2_tokenizer.encode("The cat sat on the mat.")
    model = scripted_model([*ids[1:], ids[-1]])
    out = generate(model, torch.tensor([ids[:1]]), max_new_tokens=len(ids) - 1, temperature=0)
    assert out[0].tolist() == ids


TEXT = "Ünïcödé 🙂 text: 中文 and ✓ checks"


def stream(model: GPT2, tokenizer: Tokenizer, prompt: str, **options) -> tuple[list[str], list[int]]:
    """complete(stream=True) as text pieces (empty ones left out) and every token id it reported."""
    pieces, ids = [], []
    for chunk in complete(model, tokenizer, prompt, stream=True, **options):
        ids += chunk.token_ids
        if chunk.text:
            pieces.append(chunk.text)
    return pieces, ids


def test_streaming_never_splits_a_character(gpt2_tokenizer: Tokenizer) -> None:
    eot = gpt2_tokenizer.eot_token
    ids = gpt2_tokenizer.encode(TEXT)
    split = [i for i in ids if "\ufffd" in gpt2_tokenizer.decode([i])]
    assert len(split) >= 4, "the text must contain characters spread over several tokens"
    model = scripted_model([*ids, eot, *ids])
    pieces, seen = stream(model, gpt2_tokenizer, "", max_new_tokens=100, temperature=0)
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces), pieces
    assert len(pieces) < len(ids), "bytes of one character are held back until it is complete"
    assert seen == [*ids, eot], "the chunks carry every generated id, <|endoftext|> included"


def test_streaming_continues_a_prompt(gpt2_tokenizer: Tokenizer) -> None:
    ids = gpt2_tokenizer.encode("Say: " + TEXT)
    prompt_len = len(gpt2_tokenizer.encode("Say:"))
    model = scripted_model([*ids[1:], ids[-1]])  # after position p comes ids[p + 1]
    n = len(ids) - prompt_len
    pieces, _ = stream(model, gpt2_tokenizer, "Say:", max_new_tokens=n, temperature=0)
    assert "".join(pieces) == " " + TEXT


def test_streaming_matches_generate_when_sampling(pair, gpt2_tokenizer: Tokenizer) -> None:
    ours, _ = pair
    pieces, _ = stream(ours, gpt2_tokenizer, PROMPT, max_new_tokens=30, temperature=1.5, seed=2)
    ids = torch.tensor([gpt2_tokenizer.encode(PROMPT)])
    out = generate(ours, ids, max_new_tokens=30, temperature=1.5, seed=2)[0, ids.shape[1] :].tolist()
    eot = gpt2_tokenizer.eot_token
    new = out[: out.index(eot)] if eot in out else out
    assert "".join(pieces) == gpt2_tokenizer.decode(new)


def test_padded_vocabulary_is_never_sampled() -> None:
    model = tiny_model(seed=16, padded_vocab_size=128)
    with torch.no_grad():
        model.wte.weight[97:] = 50.0  # the padding rows would dominate if they were scored
    out = generate(model, torch.tensor([[1, 2]]), max_new_tokens=40, temperature=5.0, seed=0, eos_token_id=-1)
    assert out.max() < 97


# --- attention masks, prompt id types, top_k=0 ----------------------------------------------


@pytest.mark.parametrize(
    ("mask", "fragment"),
    [
        ([[1, 1, 0], [1, 1, 1]], "row 0 has a 0 after a 1"),  # right padding
        ([[1, 1, 1], [1, 0, 1]], "row 1 has a 0 after a 1"),  # a hole
        ([[0, 0, 0], [1, 1, 1]], "row 0 is all 0s"),
        ([[1, 1, 2], [1, 1, 1]], "only 0 (padding) and 1"),
        ([[1, 1], [1, 1]], "shaped like input_ids (2, 3)"),
    ],
)
def test_attention_mask_must_be_left_padding(mask: list[list[int]], fragment: str) -> None:
    model = tiny_model(seed=20)
    ids = torch.tensor([[5, 6, 96], [7, 8, 9]])
    with pytest.raises(ConfigError, match=re.escape(fragment)) as e:
        generate(model, ids, attention_mask=torch.tensor(mask), max_new_tokens=3, temperature=0)
    assert "\n" not in str(e.value)
    if "after a 1" in fragment:
        assert "left-pad" in str(e.value) and "list of token-id lists" in str(e.value)
    with pytest.raises(ConfigError, match=re.escape(fragment)):  # beam search checks it too
        generate(model, ids, attention_mask=torch.tensor(mask), max_new_tokens=3, num_beams=2)


def test_left_padding_and_all_ones_masks_still_work() -> None:
    """`transformers`-style input: left padding (0s then 1s) gives each row what it gives alone;
    an all-ones mask (bool or int) is the same as no mask."""
    model = tiny_model(seed=21)
    ids = torch.tensor([[96, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=6, temperature=0, eos_token_id=-1)
    alone = generate(model, torch.tensor([[5, 6]]), max_new_tokens=6, temperature=0, eos_token_id=-1)
    assert out[0, 3:].tolist() == alone[0, 2:].tolist()
    plain = generate(model, ids, max_new_tokens=6, temperature=0, eos_token_id=-1)
    for ones in (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)):
        got = generate(model, ids, attention_mask=ones, max_new_tokens=6, temperature=0, eos_token_id=-1)
        assert got.tolist() == plain.tolist()


def test_prompts_may_be_numpy_integers_or_arrays() -> None:
    model = tiny_model(seed=22)
    want = generate(model, [[5, 6], [7]], max_new_tokens=5, seed=1)
    assert generate(model, [np.array([5, 6]), [np.int64(7)]], max_new_tokens=5, seed=1) == want
    assert generate(model, [[np.int32(5), np.uint8(6)], torch.tensor([7])], max_new_tokens=5, seed=1) == want
    assert generate(model, ([5, 6], (7,)), max_new_tokens=5, seed=1) == want


@pytest.mark.parametrize(
    "prompt",
    [[True, 5], [5.0], np.array([5.0]), [np.float64(5)], torch.tensor([True]), [np.bool_(True)], [[5]]],
    ids=["bool", "float", "float-array", "numpy-float", "bool-tensor", "numpy-bool", "nested"],
)
def test_prompts_of_bools_or_floats_are_refused(prompt) -> None:
    with pytest.raises(ConfigError, match="list of integer token ids"):
        generate(tiny_model(), [prompt], max_new_tokens=2)


def test_top_k_zero_means_no_top_k() -> None:
    model = tiny_model(seed=23)
    ids = torch.tensor([[1, 2, 3]])
    off = generate(model, ids, max_new_tokens=16, seed=5, eos_token_id=-1)
    assert generate(model, ids, max_new_tokens=16, seed=5, top_k=0, eos_token_id=-1).tolist() == off.tolist()
    assert generate(model, ids, max_new_tokens=16, seed=5, top_k=3, eos_token_id=-1).tolist() != off.tolist()
    with pytest.raises(ConfigError, match=re.escape("top_k must be an integer >= 0 (0 = off), got -1")):
        generate(model, ids, max_new_tokens=2, top_k=-1)
