"""Each logits processor against a hand-computed case and against transformers' own; stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2kit.errors import ConfigError
from gpt2kit.processors import (
    History,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    build_pipeline,
)
from gpt2kit.stopping import TextStream

INF = float("inf")


def hist(*rows: list[int]) -> History:
    ids = torch.tensor(rows)
    return History(ids, torch.ones_like(ids, dtype=torch.bool))


def test_temperature_divides() -> None:
    assert Temperature(0.5)(torch.tensor([[1.0, -2.0]]), None).tolist() == [[2.0, -4.0]]


def test_top_k_keeps_k_and_ties() -> None:
    out = TopK(2)(torch.tensor([[1.0, 5.0, 3.0, 3.0, 0.0]]), None)
    assert out.tolist() == [[-INF, 5.0, 3.0, 3.0, -INF]]


def test_top_p_hand_computed() -> None:
    probs = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    # Sorted: 0.4, 0.3 (0.7 >= 0.65 reached), so 0.2 and 0.1 go.
    out = TopP(0.65)(probs.log(), None)
    assert torch.isinf(out).tolist() == [[True, False, False, True]]
    # p at exactly the first token's mass keeps just it.
    assert torch.isfinite(TopP(0.4)(probs.log(), None)).sum() == 1


def test_min_p_hand_computed() -> None:
    probs = torch.tensor([[0.5, 0.26, 0.24]])
    # Threshold 0.5 * 0.5 = 0.25: 0.24 goes, 0.26 stays.
    out = MinP(0.5)(probs.log(), None)
    assert torch.isinf(out).tolist() == [[False, False, True]]


def test_repetition_penalty_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0], [2.0, -1.0, 3.0, -4.0]])
    h = History(
        torch.tensor([[0, 1, 1], [3, 3, 3]]), torch.tensor([[True, True, True], [False, False, True]])
    )
    out = RepetitionPenalty(2.0)(logits, h)
    # Row 0 saw 0 and 1 (positive halves, negative doubles); row 1 saw only 3 (padding ignored).
    assert out.tolist() == [[1.0, -2.0, 3.0, -4.0], [2.0, -1.0, 3.0, -8.0]]


def test_no_repeat_ngram_hand_computed() -> None:
    # Trigrams seen: (1,2,3), (2,3,1), (3,1,2); the row ends with (1, 2), so 3 is banned.
    out = NoRepeatNGram(3)(torch.zeros(1, 5), hist([1, 2, 3, 1, 2]))
    assert out.tolist() == [[0.0, 0.0, 0.0, -INF, 0.0]]
    # Too short to complete any n-gram: untouched.
    assert NoRepeatNGram(4)(torch.zeros(1, 5), hist([1, 2])).tolist() == [[0.0] * 5]


def test_processors_match_transformers() -> None:
    tp = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    V = 50
    scores = torch.randn(3, V) * 3
    ids = torch.randint(0, 8, (3, 12))  # small alphabet, so n-grams repeat
    h = History(ids, torch.ones_like(ids, dtype=torch.bool))
    cases = [
        (RepetitionPenalty(1.3), tp.RepetitionPenaltyLogitsProcessor(1.3)),
        (NoRepeatNGram(2), tp.NoRepeatNGramLogitsProcessor(2)),
        (Temperature(0.7), tp.TemperatureLogitsWarper(0.7)),
        (TopK(5), tp.TopKLogitsWarper(5)),
        (TopP(0.8), tp.TopPLogitsWarper(0.8)),
        (MinP(0.1), tp.MinPLogitsWarper(0.1)),
    ]
    for ours, theirs in cases:
        torch.testing.assert_close(ours(scores, h), theirs(ids, scores.clone()), msg=type(ours).__name__)


def test_pipeline_order_and_neutral_values() -> None:
    pipe = build_pipeline(
        temperature=0.5, top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.1, no_repeat_ngram_size=2
    )
    names = [type(p).__name__ for p in pipe.processors]
    assert names == ["RepetitionPenalty", "NoRepeatNGram", "Temperature", "TopK", "TopP", "MinP"]
    assert build_pipeline(top_p=1.0, repetition_penalty=1.0, min_p=0.0).processors == ()
    # top_k=0 is "off", as in transformers: no filter, and not greedy.
    off = build_pipeline(top_k=0, temperature=0.5)
    assert [type(p).__name__ for p in off.processors] == ["Temperature"] and not off.greedy
    greedy = build_pipeline(temperature=0, top_k=5, repetition_penalty=2.0)
    assert greedy.greedy and [type(p).__name__ for p in greedy.processors] == ["RepetitionPenalty"]


def test_pipeline_composes() -> None:
    logits = torch.tensor([[4.0, 2.0, 1.0, 0.0]])
    out = build_pipeline(temperature=2.0, top_k=2, repetition_penalty=2.0)(logits, hist([0]))
    # Penalty halves token 0 (4 -> 2), temperature halves all, top-2 keeps tokens 0 and 1.
    assert out.tolist() == [[1.0, 1.0, -INF, -INF]]


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        (dict(min_p=1.5), "--min-p"),
        (dict(repetition_penalty=0.0), "--repetition-penalty"),
        (dict(repetition_penalty=math.inf), "--repetition-penalty"),
        (dict(no_repeat_ngram_size=0), "--no-repeat-ngram-size"),
        (dict(temperature=-1.0), "--temperature"),
        (dict(top_k=-1), "--top-k"),
        (dict(top_k=1.5), "--top-k"),
        (dict(top_k=False), "--top-k"),
    ],
)
def test_bad_options_name_the_flag(options: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        build_pipeline(**options)


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
    with pytest.raises(ConfigError, match="stop strings"):
        TextStream(stop=[""])
