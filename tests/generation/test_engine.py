"""The engine: rows in cache slots, each at its own position, give exactly what each row gives alone."""

from __future__ import annotations

import pytest
import torch

from conftest import from_hf, hf_model, tiny_model
from gpt2kit.errors import ConfigError
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import Engine, FinishEvent, PromptEvent, TokenEvent
from gpt2kit.generation.generate import generate
from gpt2kit.model.gpt2 import GPT2

PROMPTS = [[464, 3290, 318], [15496] * 11, [40, 1101], [50256], list(range(100, 140))]
EOS = 50256


@pytest.fixture(scope="module")
def model() -> GPT2:
    hf = hf_model(seed=3, vocab_size=50257, n_positions=256, n_embd=32, n_layer=2, n_head=4)
    return from_hf(hf)


def run(engine: Engine) -> list:
    return list(engine.events())


def alone(model: GPT2, prompt: list[int], config: SamplingConfig, seed: int | None) -> list[int]:
    engine = Engine(model, slots=1, eos_token_id=EOS)
    row = engine.add(prompt, config, seed=seed)
    run(engine)
    return row.tokens


def test_greedy_equals_transformers_at_mixed_positions(model: GPT2) -> None:
    hf = hf_model(seed=3, vocab_size=50257, n_positions=256, n_embd=32, n_layer=2, n_head=4)
    engine = Engine(model, slots=len(PROMPTS), eos_token_id=-1)
    rows = [engine.add(p, SamplingConfig(max_new_tokens=12, temperature=0)) for p in PROMPTS]
    run(engine)
    for prompt, row in zip(PROMPTS, rows, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=12,
                pad_token_id=EOS,
                eos_token_id=None,
            )
        assert row.tokens == want[0, len(prompt) :].tolist()


def test_rows_joining_mid_batch_give_what_they_give_alone(model: GPT2) -> None:
    configs = [
        SamplingConfig(max_new_tokens=8 + 3 * i, temperature=0.9, top_k=50 if i % 2 else None, seed=100)
        for i in range(len(PROMPTS))
    ]
    want = [alone(model, p, c, 100 + i) for i, (p, c) in enumerate(zip(PROMPTS, configs, strict=True))]
    # Three slots for five rows: rows wait for a free slot and join a batch that is decoding,
    # and a late row is added after some steps have run.
    engine = Engine(model, slots=3, eos_token_id=EOS)
    rows = [
        engine.add(p, c, seed=100 + i) for i, (p, c) in enumerate(zip(PROMPTS[:4], configs[:4], strict=True))
    ]
    for _ in range(3):
        engine.step()
    rows.append(engine.add(PROMPTS[4], configs[4], seed=104))
    run(engine)
    assert [r.tokens for r in rows] == want


def test_rows_with_different_settings_share_a_batch(model: GPT2) -> None:
    configs = [
        SamplingConfig(max_new_tokens=10, temperature=0),
        SamplingConfig(max_new_tokens=10, repetition_penalty=1.5, seed=1),
        SamplingConfig(max_new_tokens=10, presence_penalty=1.0, frequency_penalty=0.5, seed=1),
        SamplingConfig(max_new_tokens=10, no_repeat_ngram_size=2, top_p=0.8, seed=1),
        SamplingConfig(max_new_tokens=10, logit_bias={11: 5.0}, min_p=0.05, seed=1),
    ]
    want = [alone(model, p, c, 7 + i) for i, (p, c) in enumerate(zip(PROMPTS, configs, strict=True))]
    engine = Engine(model, slots=5, eos_token_id=EOS)
    rows = [engine.add(p, c, seed=7 + i) for i, (p, c) in enumerate(zip(PROMPTS, configs, strict=True))]
    run(engine)
    assert [r.tokens for r in rows] == want
    assert rows[4].tokens.count(11) > 3, "a +5 bias on token 11 makes it frequent"


def test_events_and_finish_reasons(model: GPT2) -> None:
    engine = Engine(model, slots=2, eos_token_id=EOS)
    row = engine.add(PROMPTS[0], SamplingConfig(max_new_tokens=4, temperature=0, logprobs=2))
    events = run(engine)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.token for e in tokens] == row.tokens and len(row.tokens) == 4
    assert events[-1] == FinishEvent(row, "length")
    with torch.no_grad():
        logp = model(torch.tensor([PROMPTS[0] + row.tokens])).logits[0].log_softmax(-1)
    for t, e in enumerate(tokens):
        pos = len(PROMPTS[0]) - 1 + t
        assert e.logprob == pytest.approx(logp[pos, e.token].item(), abs=1e-5)
        assert [i for i, _ in e.top] == logp[pos].topk(2).indices.tolist()


def test_eos_ends_a_row_and_the_context_ends_it_too() -> None:
    model = tiny_model(seed=4, n_positions=16)
    engine = Engine(model, slots=2, eos_token_id=-1)
    row = engine.add([1, 2, 3], SamplingConfig(max_new_tokens=100, seed=0))
    run(engine)
    assert len(row.tokens) == 13 and row.finish_reason == "length", "3 + 13 positions fill the context"
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=3, temperature=0, eos_token_id=-1)[0][3:]
    stopper = Engine(model, slots=1, eos_token_id=greedy[0])
    row = stopper.add([1, 2, 3], SamplingConfig(max_new_tokens=10, temperature=0))
    run(stopper)
    assert row.tokens == greedy[:1] and row.finish_reason == "stop", "the eos is the last token"


def test_cancel_frees_the_slot(model: GPT2) -> None:
    engine = Engine(model, slots=1, eos_token_id=EOS)
    first = engine.add(PROMPTS[0], SamplingConfig(max_new_tokens=200, seed=0))
    second = engine.add(PROMPTS[2], SamplingConfig(max_new_tokens=3, temperature=0))
    engine.step()
    engine.step()
    first.cancel()
    events = run(engine)
    assert FinishEvent(first, "cancelled") in events and len(first.tokens) == 2
    assert second.tokens == alone(model, PROMPTS[2], SamplingConfig(max_new_tokens=3, temperature=0), None)
    waiting = engine.add(PROMPTS[1], SamplingConfig(max_new_tokens=3))
    waiting.cancel()
    assert run(engine) == [FinishEvent(waiting, "cancelled")], "a row cancelled before it joined"


def test_prompt_logprobs_equal_log_softmax(model: GPT2) -> None:
    prompt = PROMPTS[4]
    engine = Engine(model, slots=1, eos_token_id=EOS)
    row = engine.add(prompt, SamplingConfig(max_new_tokens=0, logprobs=3), prompt_logprobs=True)
    events = run(engine)
    assert isinstance(events[0], PromptEvent) and events[-1] == FinishEvent(row, "length")
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = [float(ref[t - 1, prompt[t]]) for t in range(1, len(prompt))]
    assert events[0].logprobs[0] is None
    assert events[0].logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert [i for i, _ in events[0].top[5]] == ref[4].topk(3).indices.tolist()


def test_bad_rows_are_refused(model: GPT2) -> None:
    engine = Engine(model, slots=1, max_len=8, eos_token_id=EOS)
    with pytest.raises(ConfigError, match="at least one token"):
        engine.add([], SamplingConfig())
    with pytest.raises(ConfigError, match=r"token id 50257 is outside"):
        engine.add([50257], SamplingConfig())
    with pytest.raises(ConfigError, match="the cache holds 8"):
        engine.add(list(range(9)), SamplingConfig())
    with pytest.raises(ConfigError, match="logit_bias token id 60000"):
        engine.add([1], SamplingConfig(logit_bias={60000: 1.0}))
    with pytest.raises(ConfigError, match="slots must be"):
        Engine(model, slots=0)


def test_emit_hands_out_each_first_token_right_after_its_own_prefill(model: GPT2) -> None:
    """With `emit`, a new row's first token goes out before the next row's prefill and
    before the round's decode; the running rows' tokens go out before any prefill."""
    engine = Engine(model, slots=4, eos_token_id=-1)
    log: list = []
    prefill, decode = engine.cache.prefill, engine.cache.decode

    def logged_prefill(first, prompts):
        log.append(("prefill", first))
        return prefill(first, prompts)

    def logged_decode(tokens, positions):
        log.append(("decode", len(positions)))
        return decode(tokens, positions)

    engine.cache.prefill, engine.cache.decode = logged_prefill, logged_decode
    config = SamplingConfig(max_new_tokens=3, temperature=0)
    rows = [engine.add(p, config) for p in PROMPTS[:3]]

    def emit(events) -> None:
        log.append(("emit", [(rows.index(e.row), type(e).__name__) for e in events]))

    assert engine.step(emit) == []  # everything went to emit
    assert log == [
        ("prefill", 0),
        ("emit", [(0, "TokenEvent")]),
        ("prefill", 1),
        ("emit", [(1, "TokenEvent")]),
        ("prefill", 2),
        ("emit", [(2, "TokenEvent")]),
        ("decode", 3),
    ]
    log.clear()
    late = engine.add(PROMPTS[3], config)
    rows.append(late)
    engine.step(emit)
    assert log == [
        ("emit", [(0, "TokenEvent"), (1, "TokenEvent"), (2, "TokenEvent")]),
        ("prefill", 3),
        ("emit", [(3, "TokenEvent")]),
        ("decode", 4),
    ]
    while engine.busy:
        engine.step(emit)
    want = Engine(model, slots=4, eos_token_id=-1)
    same = [want.add(p, config) for p in PROMPTS[:4]]
    run(want)
    assert [r.tokens for r in rows] == [r.tokens for r in same]


def test_a_slot_freed_in_a_round_takes_a_waiting_row_in_the_same_round(model: GPT2) -> None:
    engine = Engine(model, slots=1, eos_token_id=-1)
    first = engine.add(PROMPTS[0], SamplingConfig(max_new_tokens=2, temperature=0))
    second = engine.add(PROMPTS[1], SamplingConfig(max_new_tokens=2, temperature=0))
    engine.step()  # first: prefill, token 1, decode
    events = engine.step()  # first: token 2 (done); second: prefill and token 1 in this round
    assert [(e.row, type(e)) for e in events] == [
        (first, TokenEvent),
        (first, FinishEvent),
        (second, TokenEvent),
    ]
    run(engine)
    assert second.tokens == alone(model, PROMPTS[1], SamplingConfig(max_new_tokens=2, temperature=0), None)
