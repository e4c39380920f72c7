"""SamplingConfig, each logits processor against a hand-computed case and transformers' own,
the sampler, and stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2kit.errors import ConfigError
from gpt2kit.generation.config import (
    SamplingConfig,
    SamplingError,
    draw,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)
from gpt2kit.generation.processors import (
    History,
    add_logit_bias,
    next_tokens,
    no_repeat_ngram,
    penalise,
    presence_frequency_penalty,
    repetition_penalty,
    reshape,
)
from gpt2kit.generation.textstream import TextStream

INF = float("inf")


def seen(rows: list[list[int]], V: int) -> torch.Tensor:
    out = torch.zeros(len(rows), V, dtype=torch.bool)
    for i, row in enumerate(rows):
        out[i, row] = True
    return out


def test_temperature_divides() -> None:
    out = reshape(torch.tensor([[1.0, -2.0]]), SamplingConfig(temperature=0.5))
    assert out.tolist() == [[2.0, -4.0]]


def test_top_k_keeps_k_and_ties() -> None:
    out = top_k_filter(torch.tensor([[1.0, 5.0, 3.0, 3.0, 0.0]]), 2)
    assert out.tolist() == [[-INF, 5.0, 3.0, 3.0, -INF]]


def test_top_p_hand_computed() -> None:
    probs = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    # Sorted: 0.4, 0.3 (0.7 >= 0.65 reached), so 0.2 and 0.1 go.
    out = top_p_filter(probs.log(), 0.65)
    assert torch.isinf(out).tolist() == [[True, False, False, True]]
    # p at exactly the first token's mass keeps just it.
    assert torch.isfinite(top_p_filter(probs.log(), 0.4)).sum() == 1


def test_min_p_hand_computed() -> None:
    probs = torch.tensor([[0.5, 0.26, 0.24]])
    # Threshold 0.5 * 0.5 = 0.25: 0.24 goes, 0.26 stays.
    out = min_p_filter(probs.log(), 0.5)
    assert torch.isinf(out).tolist() == [[False, False, True]]


def test_repetition_penalty_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0], [2.0, -1.0, 3.0, -4.0]])
    out = repetition_penalty(logits, seen([[0, 1], [3]], 4), 2.0)
    # Row 0 saw 0 and 1 (positive halves, negative doubles); row 1 saw only 3.
    assert out.tolist() == [[1.0, -2.0, 3.0, -4.0], [2.0, -1.0, 3.0, -8.0]]


def test_presence_and_frequency_penalties_hand_computed() -> None:
    # OpenAI's definition: logit - count * frequency - (count > 0) * presence.
    counts = torch.tensor([[0.0, 1.0, 4.0]])
    out = presence_frequency_penalty(torch.tensor([[1.0, 1.0, 1.0]]), counts, 0.5, 0.25)
    assert out.tolist() == [[1.0, 0.25, -0.5]]
    # Negative values encourage repeats.
    out = presence_frequency_penalty(torch.zeros(1, 3), counts, -1.0, 0.0)
    assert out.tolist() == [[0.0, 1.0, 1.0]]


def test_logit_bias_adds_to_the_named_tokens() -> None:
    out = add_logit_bias(torch.zeros(2, 4), {1: 2.5, 3: -100.0})
    assert out.tolist() == [[0.0, 2.5, 0.0, -100.0]] * 2


def test_no_repeat_ngram_hand_computed() -> None:
    # Trigrams seen: (1,2,3), (2,3,1), (3,1,2); the row ends with (1, 2), so 3 is banned.
    out = no_repeat_ngram(torch.zeros(1, 5), [[1, 2, 3, 1, 2]], 3)
    assert out.tolist() == [[0.0, 0.0, 0.0, -INF, 0.0]]
    # Too short to complete any n-gram: untouched.
    assert no_repeat_ngram(torch.zeros(1, 5), [[1, 2]], 4).tolist() == [[0.0] * 5]


def test_processors_match_transformers() -> None:
    tp = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    V = 50
    scores = torch.randn(3, V) * 3
    ids = torch.randint(0, 8, (3, 12))  # small alphabet, so n-grams repeat
    history = History(seen=seen(ids.tolist(), V), tokens=ids.tolist())
    cases = [
        (SamplingConfig(repetition_penalty=1.3), tp.RepetitionPenaltyLogitsProcessor(1.3)),
        (SamplingConfig(no_repeat_ngram_size=2), tp.NoRepeatNGramLogitsProcessor(2)),
    ]
    for config, theirs in cases:
        torch.testing.assert_close(penalise(scores, config, history), theirs(ids, scores.clone()))
    warpers = [
        (SamplingConfig(temperature=0.7), tp.TemperatureLogitsWarper(0.7)),
        (SamplingConfig(top_k=5), tp.TopKLogitsWarper(5)),
        (SamplingConfig(top_p=0.8), tp.TopPLogitsWarper(0.8)),
        (SamplingConfig(min_p=0.1), tp.MinPLogitsWarper(0.1)),
    ]
    for config, theirs in warpers:
        torch.testing.assert_close(reshape(scores, config), theirs(ids, scores.clone()))


def test_order_composes() -> None:
    logits = torch.tensor([[4.0, 2.0, 1.0, 0.0]])
    config = SamplingConfig(temperature=2.0, top_k=2, repetition_penalty=2.0)
    out = reshape(penalise(logits, config, History(seen=seen([[0]], 4))), config)
    # Penalty halves token 0 (4 -> 2), temperature halves all, top-2 keeps tokens 0 and 1.
    assert out.tolist() == [[1.0, 1.0, -INF, -INF]]


def test_greedy_takes_the_argmax_after_the_penalties() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    config = SamplingConfig(temperature=0, logit_bias={0: -2.0})
    assert next_tokens(logits, config, History(), torch.tensor([0.9])).tolist() == [1]
    assert SamplingConfig(top_k=1).greedy and not SamplingConfig(top_k=0).greedy


def test_draw_is_the_inverse_cdf() -> None:
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.8]] * 4)
    got = draw(probs, torch.tensor([0.0, 0.19, 0.21, 0.9999]))
    assert got.tolist() == [1, 1, 3, 3], "zero-probability tokens are never drawn"


def test_draw_frequencies_follow_the_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    u = torch.rand(20000, generator=g)
    counts = torch.bincount(draw(p.expand(20000, 4), u), minlength=4).float() / 20000
    torch.testing.assert_close(counts, p, atol=0.015, rtol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(min_p=1.5), "min_p must be in [0, 1]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
        (dict(repetition_penalty=math.inf), "repetition_penalty must be a number > 0"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 1"),
        (dict(temperature=-1.0), "temperature must be a number >= 0"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_k=1.5), "top_k must be an integer >= 0"),
        (dict(top_k=False), "top_k must be an integer >= 0"),
        (dict(top_p=2), "top_p must be in (0, 1], got 2"),
        (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
        (dict(frequency_penalty=math.nan), "frequency_penalty must be in [-2, 2]"),
        (dict(logit_bias={5: 101}), "logit_bias values must be numbers in [-100, 100]"),
        (dict(logit_bias={"x": 1}), "logit_bias keys must be token ids"),
        (dict(logit_bias={-1: 1}), "logit_bias keys must be token ids >= 0"),
        (dict(logit_bias=[1, 2]), "logit_bias must map token ids to numbers"),
        (dict(stop=[""]), "stop '' would stop before the first token"),
        (dict(min_tokens=5, max_new_tokens=4), "min_tokens must be an integer in [0, max_new_tokens=4]"),
        (dict(ignore_eos=1), "ignore_eos must be true or false"),
        (dict(skip_special_tokens=None), "skip_special_tokens must be true or false"),
        (dict(stop=5), "stop must be a string or a list of strings"),
        (dict(n=0), "n must be an integer >= 1"),
        (dict(seed=1.5), "seed must be an integer or None"),
        (dict(logprobs=21), "logprobs must be an integer in [0, 20]"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    ],
)
def test_bad_options_name_the_field(options: dict, message: str) -> None:
    with pytest.raises(SamplingError) as e:
        SamplingConfig(**options)
    assert str(e.value).startswith(message), str(e.value)
    assert e.value.field == next(iter(options))
    assert isinstance(e.value, ConfigError)


def test_config_normalises_and_is_frozen() -> None:
    c = SamplingConfig(top_k=0, stop="x", logit_bias={"7": 1, 3: -2}, no_repeat_ngram_size=0)
    assert c.top_k is None and c.stop == ("x",) and c.no_repeat_ngram_size is None
    assert dict(c.logit_bias) == {3: -2.0, 7: 1.0}
    assert c == SamplingConfig(stop=["x"], logit_bias={3: -2, 7: 1.0}) and hash(c)
    with pytest.raises(TypeError):
        c.logit_bias[3] = 0.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        c.top_k = 3  # type: ignore[misc]
    assert c.replace(seed=4).seed == 4 and c.row_seed(2) is None and c.replace(seed=4).row_seed(2) == 6
    with pytest.raises(SamplingError, match="top_p"):
        c.replace(top_p=0)
    with pytest.raises(SamplingError, match="tempreature is not a sampling option"):
        SamplingConfig.build(c, tempreature=1.0)


def test_text_stream_holds_back_a_possible_stop_string() -> None:
    s = TextStream(stop=["END"])
    assert s.push(b"abc E") == "abc "  # "E" may start "END"
    assert s.push(b"N") == ""
    assert s.push(b"X") == "ENX"  # it did not: released
    assert s.push(b" EN") == " "
    assert s.push(b"D and more") == ""
    assert s.stopped and s.text == "abc ENX "


def test_text_stream_flushes_unfinished_stop_at_the_end() -> None:
    s = TextStream(stop=["\n\n"])
    assert s.push(b"line\n") == "line"
    assert s.finish() == "\n" and s.text == "line\n" and not s.stopped


def test_text_stream_never_splits_a_character() -> None:
    s = TextStream()
    data = "héllo 🙂".encode()
    pieces = [s.push(data[i : i + 1]) for i in range(len(data))] + [s.finish()]
    assert "".join(pieces) == "héllo 🙂"
    assert all("\ufffd" not in p for p in pieces)


def test_text_stream_earliest_stop_wins() -> None:
    s = TextStream(stop=["cd", "b"])
    assert s.push(b"abcd") == "a" and s.stopped


def test_bad_stop_strings() -> None:
    with pytest.raises(ConfigError, match="would stop before the first token"):
        TextStream(stop=[""])


def test_text_stream_counts_tokens_up_to_the_stop() -> None:
    s = TextStream(stop=["END"])
    for piece in (b"a", b"b", b"EN", b"D", b"more", b"tokens"):
        s.push(piece)
    assert s.stopped and s.tokens == 4, "the token that completed the stop string is the last counted"
