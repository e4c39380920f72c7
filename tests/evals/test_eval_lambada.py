"""LAMBADA accuracy and perplexity on a model whose next-token distribution is known by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gpt2kit import GPT2, GPT2Config
from gpt2kit.evals.lambada import evaluate_lambada
from gpt2kit.evals.tasks import load_task

THE = 262  # " the"
V = 50257


def fixed_distribution_model() -> GPT2:
    """Predicts the same distribution everywhere: " the" has logit ln 4, every other token 0.

    ln_f's weight is 0, so its output is its bias whatever the input; the logits are then
    wte @ bias, and only the row of " the" has a non-zero first component.
    """
    config = GPT2Config(
        vocab_size=V, n_positions=64, n_embd=8, n_layer=1, n_head=1, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    model = GPT2(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_f.bias[0] = 1.0
        model.wte.weight[THE, 0] = math.log(4.0)
    return model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_hand_computed_accuracy_and_perplexity(tmp_path, gpt2_tokenizer):
    rows = [
        {"context": "The cat sat on", "target": "the"},  # [the]: greedy, right
        {"context": "The cat sat on", "target": "thethe"},  # [the, "the"]: 2nd token is not the argmax
        {"context": "She lives in", "target": "Paris"},  # [Paris]: wrong from the start
        {"context": "Over and over:", "target": "the the"},  # [the, the]: two tokens, both argmax
    ]
    assert [gpt2_tokenizer.encode(" " + r["target"]) for r in rows] == [
        [THE],
        [THE, 1169],
        [6342],
        [THE, THE],
    ]
    task = load_task(write_jsonl(tmp_path / "t.jsonl", rows), kind="lambada")
    result = evaluate_lambada(fixed_distribution_model(), gpt2_tokenizer, task, batch_size=3)

    log_z = math.log(4 + (V - 1))
    right, other = math.log(4) - log_z, -log_z
    word_logprobs = [right, right + other, other, 2 * right]
    assert [it["logprob"] for it in result["items"]] == pytest.approx(word_logprobs, rel=1e-5)
    assert [it["correct"] for it in result["items"]] == [True, False, False, True]
    m = result["metrics"]
    assert m["acc"] == 0.5
    assert m["n_target_tokens"] == 6
    assert m["perplexity"] == pytest.approx(math.exp(-sum(word_logprobs) / 4), rel=1e-5)
    assert m["token_perplexity"] == pytest.approx(math.exp(-sum(word_logprobs) / 6), rel=1e-5)


def test_lambada_plain_text_and_few_shot(tmp_path, tiny_hf_dir, gpt2_tokenizer):
    """LAMBADA's text release loads, and few-shot examples end up in front of every context."""
    plain = tmp_path / "lambada.txt"
    plain.write_text("one two three four\nthe quick brown fox jumps\n\nhello there world\n", encoding="utf-8")
    task = load_task(plain, kind="lambada", fewshot_path=plain)
    assert [(it.context, it.targets) for it in task.items] == [
        ("one two three", ("four",)),
        ("the quick brown fox", ("jumps",)),
        ("hello there", ("world",)),
    ]
    model = GPT2.from_pretrained(tiny_hf_dir)
    zero = evaluate_lambada(model, gpt2_tokenizer, task, shots=0)
    two = evaluate_lambada(model, gpt2_tokenizer, task, shots=2)
    assert zero["metrics"]["n_items"] == two["metrics"]["n_items"] == 3
    # The examples change the context, so the scores change; the targets don't.
    assert [it["logprob"] for it in zero["items"]] != [it["logprob"] for it in two["items"]]
    assert zero["metrics"]["n_target_tokens"] == two["metrics"]["n_target_tokens"]


def test_word_and_token_targets_by_hand(tmp_path, gpt2_tokenizer):
    """The two conventions on items where they disagree, against probabilities worked out by hand.

    The model puts logit ln 4 on " the" everywhere. word: greedy must produce every token
    of " " + target. token: the passage is tokenized whole and only its final token has to
    be the argmax, given the tokens before it (earlier pieces of the target included).
    """
    rows = [
        {"context": "The cat sat on", "target": "the"},  # [ the]: both right
        {"context": "She lives in", "target": "Paris the"},  # [ Paris,  the]: token right, word wrong
        {"context": "Over and over", "target": "the thethe"},  # [ the,  the, the]: both wrong
        {"context": "She lives in", "target": "Paris"},  # [ Paris]: both wrong
    ]
    passages = [gpt2_tokenizer.encode(r["context"] + " " + r["target"]) for r in rows]
    assert [p[-1] for p in passages] == [THE, THE, 1169, 6342]
    task = load_task(write_jsonl(tmp_path / "t.jsonl", rows), kind="lambada")
    model = fixed_distribution_model()
    word = evaluate_lambada(model, gpt2_tokenizer, task, target="word", batch_size=2)
    token = evaluate_lambada(model, gpt2_tokenizer, task, target="token", batch_size=3)

    log_z = math.log(4 + (V - 1))
    right, other = math.log(4) - log_z, -log_z
    assert [it["correct"] for it in word["items"]] == [True, False, False, False]
    assert word["metrics"]["acc"] == 0.25
    assert [it["logprob"] for it in word["items"]] == pytest.approx(
        [right, other + right, 2 * right + other, other], rel=1e-5
    )

    assert [it["correct"] for it in token["items"]] == [True, True, False, False]
    assert [it["target_token"] for it in token["items"]] == [" the", " the", "the", " Paris"]
    final = [right, right, other, other]
    assert [it["logprob"] for it in token["items"]] == pytest.approx(final, rel=1e-5)
    assert token["metrics"]["acc"] == 0.5
    assert token["metrics"]["perplexity"] == pytest.approx(math.exp(-sum(final) / 4), rel=1e-5)
    assert token["metrics"]["n_items"] == 4


def test_token_target_sees_the_words_earlier_pieces(tmp_path, tiny_hf_dir, gpt2_tokenizer):
    """token: the final token's log-probability given the whole passage before it, as transformers computes it."""
    import transformers

    rows = [
        {"context": "It was a dark and stormy", "target": "nightingale"},
        {"context": "Numbers:", "target": "1234567"},
    ]
    task = load_task(write_jsonl(tmp_path / "t.jsonl", rows), kind="lambada")
    result = evaluate_lambada(GPT2.from_pretrained(tiny_hf_dir), gpt2_tokenizer, task, target="token")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    for row, item in zip(rows, result["items"], strict=True):
        ids = gpt2_tokenizer.encode(row["context"] + " " + row["target"])
        assert len(gpt2_tokenizer.encode(" " + row["target"])) > 1  # a multi-token last word
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids[:-1]])).logits[0, -1].double(), -1)
        assert item["logprob"] == pytest.approx(logp[ids[-1]].item(), abs=1e-4)
        assert item["correct"] == (logp.argmax().item() == ids[-1])


def test_unknown_target_is_refused(tmp_path, gpt2_tokenizer):
    from gpt2kit.errors import ConfigError

    task = load_task(write_jsonl(tmp_path / "t.jsonl", [{"context": "a", "target": "b"}]), kind="lambada")
    with pytest.raises(ConfigError, match="target must be one of word, token"):
        evaluate_lambada(fixed_distribution_model(), gpt2_tokenizer, task, target="char")
