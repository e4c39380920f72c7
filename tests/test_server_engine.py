"""The batching engine: batched rows give exactly what each row gives alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import hf_model
from gpt2kit.checkpoint import from_hf_state_dict
from gpt2kit.config import GPT2Config
from gpt2kit.generate import generate
from gpt2kit.model import GPT2
from gpt2kit.server.engine import (
    Engine,
    EngineBusy,
    FinishEvent,
    PromptEvent,
    SamplingParams,
    TokenEvent,
    sample_rows,
)

PROMPTS = [[464, 3290, 318], [15496] * 11, [40, 1101], [50256], list(range(100, 140))]


@pytest.fixture(scope="module")
def model() -> GPT2:
    hf = hf_model(seed=3, vocab_size=50257, n_positions=256, n_embd=32, n_layer=2, n_head=4)
    config = GPT2Config.from_hf_dict(hf.config.to_dict())
    with torch.device("meta"):
        ours = GPT2(config)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), ours), assign=True)
    return ours.eval()


@pytest.fixture
def engine(model: GPT2):
    eng = Engine(model, eos_token_id=50256)
    yield eng
    eng.stop()


def tokens(row) -> tuple[list[int], str]:
    out, reason = [], None
    for event in row.events(timeout=60):
        if isinstance(event, TokenEvent):
            out.append(event.token)
        elif isinstance(event, FinishEvent):
            reason = event.reason
    return out, reason


def test_greedy_matches_generate(engine: Engine, model: GPT2) -> None:
    for prompt in PROMPTS:
        row = engine.submit(prompt, SamplingParams(max_tokens=12, temperature=0))[0]
        got, reason = tokens(row)
        ref = generate(model, torch.tensor([prompt]), max_new_tokens=12, temperature=0)[0, len(prompt) :]
        ref = ref.tolist()
        if 50256 in ref:  # the engine stops at <|endoftext|> and does not return it
            ref = ref[: ref.index(50256)]
        assert got == ref
        assert reason == ("stop" if len(ref) < 12 else "length")


def test_sample_rows_follows_the_distribution() -> None:
    logits = torch.tensor([1.0, 2.0, 0.0, 3.0, 0.0]).log()  # probabilities 1/6, 2/6, 0, 3/6, 0
    n = 30_000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    drawn = sample_rows(logits.expand(n, -1), temperature=torch.ones(n), top_p=torch.ones(n), generators=gens)
    freq = torch.bincount(drawn, minlength=5).float() / n
    torch.testing.assert_close(freq, torch.tensor([1 / 6, 2 / 6, 0, 3 / 6, 0]), atol=0.01, rtol=0)


def test_sample_rows_settings_per_row() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(3, -1)  # token 3 has p = 0.64
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    temps, top_ps = torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.5])
    seen = set()
    for _ in range(200):
        drawn = sample_rows(logits, temperature=temps, top_p=top_ps, generators=gens).tolist()
        assert drawn[0] == 3  # greedy
        assert drawn[2] == 3  # the 0.5 nucleus is token 3 alone
        seen.add(drawn[1])
    assert seen == {0, 1, 2, 3}


def test_batched_equals_alone_even_when_joining_mid_flight(engine: Engine) -> None:
    params = [
        SamplingParams(max_tokens=8 + 3 * i, temperature=0.9, seed=100 + i) for i in range(len(PROMPTS))
    ]
    alone = [tokens(engine.submit(p, s)[0]) for p, s in zip(PROMPTS, params, strict=True)]
    together = [engine.submit(p, s)[0] for p, s in zip(PROMPTS, params, strict=True)]
    assert [tokens(r) for r in together] == alone
    staggered = []
    for p, s in zip(PROMPTS, params, strict=True):
        staggered.append(engine.submit(p, s)[0])
        time.sleep(0.005)  # later rows join a batch that is already decoding
    assert [tokens(r) for r in staggered] == alone


def test_n_choices_use_consecutive_seeds(engine: Engine) -> None:
    rows = engine.submit(PROMPTS[0], SamplingParams(max_tokens=6, seed=5), n=3)
    many = [tokens(r)[0] for r in rows]
    singles = [
        tokens(engine.submit(PROMPTS[0], SamplingParams(max_tokens=6, seed=5 + i))[0])[0] for i in range(3)
    ]
    assert many == singles
    assert len({tuple(t) for t in many}) > 1


def test_prompt_logprobs_equal_log_softmax(engine: Engine, model: GPT2) -> None:
    prompt = PROMPTS[4]
    row = engine.submit(prompt, SamplingParams(max_tokens=0, logprobs=3, prompt_logprobs=True))[0]
    events = list(row.events(timeout=60))
    assert isinstance(events[0], PromptEvent) and events[-1] == FinishEvent("length")
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = [None] + [float(ref[t - 1, prompt[t]]) for t in range(1, len(prompt))]
    assert events[0].logprobs[0] is None
    assert events[0].logprobs[1:] == pytest.approx(expected[1:], abs=1e-5)
    top = events[0].top[5]
    assert [i for i, _ in top[:3]] == ref[4].topk(3).indices.tolist()


def test_cancel_stops_a_row(engine: Engine) -> None:
    row = engine.submit(PROMPTS[0], SamplingParams(max_tokens=250, seed=0))[0]
    first = next(iter(row.events(timeout=60)))
    assert isinstance(first, TokenEvent)
    row.cancel()
    rest = list(row.events(timeout=60))
    assert rest[-1].reason == "cancelled"
    assert len(rest) < 249
    assert engine.load == 0


def test_busy_when_full(model: GPT2) -> None:
    eng = Engine(model, eos_token_id=50256, max_pending=1)
    try:
        row = eng.submit(PROMPTS[0], SamplingParams(max_tokens=250, seed=0))[0]
        with pytest.raises(EngineBusy):
            eng.submit(PROMPTS[0], SamplingParams(max_tokens=1))
        row.cancel()
        tokens(row)
        assert tokens(eng.submit(PROMPTS[0], SamplingParams(max_tokens=2, seed=0))[0])[1] == "length"
    finally:
        eng.stop()


def test_no_batching_gives_the_same_tokens(model: GPT2, engine: Engine) -> None:
    serial = Engine(model, eos_token_id=50256, batching=False)
    try:
        params = SamplingParams(max_tokens=7, seed=9)
        rows = [serial.submit(p, params)[0] for p in PROMPTS]
        assert [tokens(r) for r in rows] == [tokens(engine.submit(p, params)[0]) for p in PROMPTS]
    finally:
        serial.stop()


def test_rows_fill_the_whole_context(engine: Engine, model: GPT2) -> None:
    # A long row and a short one with many tokens to go: the shared cache is repacked as
    # rows leave so neither runs out of positions.
    long = list(range(1000, 1000 + 250))
    a = engine.submit(long, SamplingParams(max_tokens=6, temperature=0))[0]
    b = engine.submit([464], SamplingParams(max_tokens=255, temperature=0, seed=1))[0]
    ta, tb = tokens(a), tokens(b)
    ref = generate(model, torch.tensor([[464]]), max_new_tokens=255, temperature=0, eos_token_id=-1)[
        0, 1:
    ].tolist()
    assert tb[0] == ref[: len(tb[0])]
    assert ta[1] in ("length", "stop") and tb[1] in ("length", "stop")


def test_threads_submitting_at_once(engine: Engine) -> None:
    params = SamplingParams(max_tokens=5, seed=2)
    expected = tokens(engine.submit(PROMPTS[2], params)[0])
    results: list = [None] * 8

    def worker(i: int) -> None:
        results[i] = tokens(engine.submit(PROMPTS[2], params)[0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 8
