"""The one detokenizer (generation/textstream.py) and the engine's eos rules, on real tokens."""

from __future__ import annotations

import pytest

from conftest import scripted_model
from gpt2kit.generation.complete import complete
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import Engine, FinishEvent, TokenEvent
from gpt2kit.generation.textstream import Detokenizer, decode, decode_with_offsets, finish_reason
from gpt2kit.tokenizer.tokenizer import Tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


def test_split_characters_are_never_shown_half(tok: Tokenizer) -> None:
    text = "🙂 naïve 鑫 café"
    ids = tok.encode(text)
    # GPT-2 writes the emoji with tokens that each hold part of its 4 bytes.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids] + [d.finish()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_the_eot_adds_no_text_unless_asked(tok: Tokenizer) -> None:
    ids = [*tok.encode("Hi"), EOT, *tok.encode(" there")]
    assert decode(tok, ids) == "Hi there"
    assert decode(tok, ids, SamplingConfig(skip_special_tokens=False)) == "Hi<|endoftext|> there"
    assert decode_with_offsets(tok, ids) == ("Hi<|endoftext|> there", [0, 2, 15])


def test_stop_strings_cut_or_keep(tok: Tokenizer) -> None:
    ids = tok.encode("one, two. three")
    assert decode(tok, ids, SamplingConfig(stop=".")) == "one, two"
    assert (
        decode(tok, ids, SamplingConfig(stop=[".", "three"], include_stop_str_in_output=True)) == "one, two."
    )


def test_min_tokens_text_is_not_searched(tok: Tokenizer) -> None:
    ids = tok.encode("a. b. c.")  # "a", ".", " b", ".", " c", "."
    assert len(ids) == 6
    config = SamplingConfig(stop=".", max_new_tokens=6)
    assert decode(tok, ids, config) == "a"
    assert decode(tok, ids, config.replace(min_tokens=2)) == "a. b"
    d = Detokenizer.for_config(tok, config.replace(min_tokens=2))
    assert [d.push(i) for i in ids[:3]] == ["a", ".", " b"]
    assert d.push(ids[3]) == "" and d.stopped and d.tokens == 4


def test_finish_reasons() -> None:
    assert [finish_reason(r) for r in ("stop", "length", "cancelled")] == ["stop", "length", "stop"]


# --- the engine's side: ignore_eos and min_tokens ------------------------------------------

SCRIPT = [11, 12, EOT, 13, 14, EOT, 15, 16]


def tokens(config: SamplingConfig) -> tuple[list[int], str]:
    engine = Engine(scripted_model(SCRIPT), slots=1, eos_token_id=EOT)
    row = engine.add([11], config)
    reasons = [e.reason for e in engine.events() if isinstance(e, FinishEvent)]
    return row.tokens, reasons[0]


def test_eos_ends_a_row() -> None:
    assert tokens(SamplingConfig(max_new_tokens=6, temperature=0)) == ([11, 12, EOT], "stop")


def test_ignore_eos_keeps_going() -> None:
    assert tokens(SamplingConfig(max_new_tokens=6, temperature=0, ignore_eos=True)) == (SCRIPT[:6], "length")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_never_draws_the_eos_early(temperature: float) -> None:
    for seed in range(5):
        out, reason = tokens(
            SamplingConfig(max_new_tokens=6, temperature=temperature, min_tokens=4, seed=seed)
        )
        assert EOT not in out[:4], out
        assert len(out) >= 4 or reason == "length"


def test_min_tokens_reports_the_models_own_logprobs() -> None:
    engine = Engine(scripted_model(SCRIPT), slots=2, eos_token_id=EOT)
    plain = engine.add([11], SamplingConfig(max_new_tokens=3, temperature=0, logprobs=0))
    held = engine.add([11], SamplingConfig(max_new_tokens=3, temperature=0, logprobs=0, min_tokens=3))
    events = [e for e in engine.events() if isinstance(e, TokenEvent)]
    assert held.tokens[2] != EOT and plain.tokens[2] == EOT
    first = [e.logprob for e in events if e.row is plain][:2]
    assert first == pytest.approx([e.logprob for e in events if e.row is held][:2])


def test_complete_follows_the_same_rules(tok: Tokenizer) -> None:
    model = scripted_model([*tok.encode(" world!"), EOT, *tok.encode(" Bye now, see you")])
    (c,) = complete(model, tok, "Hello", max_new_tokens=5, temperature=0)
    assert (c.text, c.token_ids[-1], c.finish_reason) == (" world!", EOT, "stop")
    (c,) = complete(
        model, tok, "Hello", max_new_tokens=5, temperature=0, ignore_eos=True, skip_special_tokens=False
    )
    assert (c.text, c.finish_reason) == (" world!<|endoftext|> Bye now", "length")
    chunks = list(
        complete(model, tok, "Hello", max_new_tokens=5, temperature=0, ignore_eos=True, stream=True)
    )
    assert "".join(ch.text for ch in chunks) == " world! Bye now"
    assert sum(len(ch.token_ids) for ch in chunks) == 5 and chunks[-1].finish_reason == "length"


def test_beam_search_refuses_the_eos_rules() -> None:
    import torch

    from gpt2kit.errors import ConfigError
    from gpt2kit.generation.generate import generate

    model = scripted_model(SCRIPT)
    for option in (dict(min_tokens=1), dict(ignore_eos=True)):
        with pytest.raises(ConfigError, match="not beams"):
            generate(model, torch.tensor([[11]]), max_new_tokens=3, num_beams=2, **option)
