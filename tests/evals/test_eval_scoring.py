"""Batched continuation scores equal log-probs summed independently with transformers."""

from __future__ import annotations

import random

import pytest
import torch

from gpt2kit.errors import DataError
from gpt2kit.evals.scoring import score_choices, score_continuations
from gpt2kit.generation.generate import generate
from gpt2kit.model import GPT2


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    import transformers

    return GPT2.from_pretrained(tiny_hf_dir), transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()


def hf_logprob(hf, context: list[int], continuation: list[int], *, n_ctx: int = 128) -> float:
    """One option alone: the sum of log P(token) over the continuation, cut to the context as lm-eval does."""
    full = (context + continuation)[-(n_ctx + 1) :]
    inp = torch.tensor([full[:-1]])
    with torch.no_grad():
        logprobs = hf(inp).logits[0].log_softmax(-1)
    n = len(continuation)
    positions = range(len(full) - 1 - n, len(full) - 1)
    return sum(float(logprobs[p, full[p + 1]]) for p in positions)


def random_items(seed: int, n_items: int, *, max_ctx: int = 40, max_opt: int = 9):
    rng = random.Random(seed)
    contexts = [[rng.randrange(50257) for _ in range(rng.randint(1, max_ctx))] for _ in range(n_items)]
    choices = [
        [[rng.randrange(50257) for _ in range(rng.randint(1, max_opt))] for _ in range(rng.randint(2, 5))]
        for _ in range(n_items)
    ]
    return contexts, choices


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_choice_scores_equal_independent_hf_logprobs(models, batch_size):
    model, hf = models
    contexts, choices = random_items(0, 7)
    contexts[2] = contexts[2][:1]  # a one-token context
    choices[3][0] = choices[3][0][:1]  # a one-token option
    calls = []
    scores = score_choices(model, contexts, choices, batch_size=batch_size, progress=calls.append)
    assert sum(calls) == len(contexts)
    for ctx, opts, item_scores in zip(contexts, choices, scores, strict=True):
        assert len(item_scores) == len(opts)
        for opt, s in zip(opts, item_scores, strict=True):
            assert s.n_tokens == len(opt)
            assert s.logprob == pytest.approx(hf_logprob(hf, ctx, opt), abs=1e-4, rel=1e-5)


def test_long_contexts_are_cut_from_the_left_like_lm_eval(models):
    model, hf = models
    rng = random.Random(1)
    contexts = [[rng.randrange(50257) for _ in range(n)] for n in (126, 127, 200, 300)]
    choices = [[[rng.randrange(50257) for _ in range(k)] for k in (1, 4, 12)] for _ in contexts]
    scores = score_choices(model, contexts, choices, batch_size=5)
    for ctx, opts, item_scores in zip(contexts, choices, scores, strict=True):
        for opt, s in zip(opts, item_scores, strict=True):
            assert s.logprob == pytest.approx(hf_logprob(hf, ctx, opt), abs=1e-4, rel=1e-5)


def test_empty_context_starts_from_endoftext(models):
    model, hf = models
    (s,) = score_continuations(model, [([], [15496, 995])])
    assert s.logprob == pytest.approx(hf_logprob(hf, [50256], [15496, 995]), abs=1e-4)


def test_greedy_flag_equals_greedy_decoding(models):
    """`greedy` is True exactly when greedy generation from the context emits the continuation."""
    model, _ = models
    rng = random.Random(2)
    requests = []
    for i in range(12):
        ctx = [rng.randrange(50257) for _ in range(rng.randint(2, 20))]
        n = 1 + i % 3
        out = generate(model, torch.tensor([ctx]), max_new_tokens=n, temperature=0.0, eos_token_id=-1)
        greedy = out[0, len(ctx) :].tolist()
        if i % 2:  # change one token: no longer what greedy decoding produces
            j = rng.randrange(n)
            greedy[j] = (greedy[j] + 1) % 50257
        requests.append((ctx, greedy, i % 2 == 0))
    scores = score_continuations(model, [(c, t) for c, t, _ in requests], batch_size=4)
    assert [s.greedy for s in scores] == [expected for _, _, expected in requests]


def test_bad_requests_are_rejected(models):
    model, _ = models
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(model, [([1, 2], [])])
    with pytest.raises(DataError, match="exceeds the model's context of 128"):
        score_continuations(model, [([1, 2], list(range(200)))])
