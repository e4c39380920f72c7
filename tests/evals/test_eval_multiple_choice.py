"""Multiple choice: acc / acc_norm from batched scores equal an independent per-option HF loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_eval_lambada import THE, V, fixed_distribution_model

from gpt2kit.cli import main
from gpt2kit.errors import DataError
from gpt2kit.evals.multiple_choice import evaluate_multiple_choice
from gpt2kit.evals.tasks import fewshot_prefix, load_task
from gpt2kit.model import GPT2


def test_acc_and_acc_norm_equal_an_unbatched_transformers_loop(tiny_hf_dir, gpt2_tokenizer):
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    task = load_task("multiple_choice_sample", kind="multiple-choice").limit(10)
    result = evaluate_multiple_choice(
        GPT2.from_pretrained(tiny_hf_dir), gpt2_tokenizer, task, shots=1, seed=7, batch_size=6
    )

    hits = hits_norm = 0
    for item, got in zip(task.items, result["items"], strict=True):
        ctx = gpt2_tokenizer.encode(fewshot_prefix(task, item, shots=1, seed=7) + item.context)
        logprobs, normed = [], []
        for choice in item.choices:
            cont = gpt2_tokenizer.encode(" " + choice)
            with torch.no_grad():
                lp = hf(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            total = sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
            logprobs.append(total)
            normed.append(total / len(choice))  # lm-eval: characters, without the " " delimiter
        assert got["logprobs"] == pytest.approx(logprobs, abs=1e-4, rel=1e-5)
        pred = max(range(4), key=logprobs.__getitem__)
        pred_norm = max(range(4), key=normed.__getitem__)
        assert (got["pred"], got["pred_norm"]) == (pred, pred_norm)
        hits += pred == item.label
        hits_norm += pred_norm == item.label
    assert result["metrics"]["acc"] == hits / 10
    assert result["metrics"]["acc_norm"] == hits_norm / 10
    assert result["metrics"]["n_options"] == 40


def test_cli_multiple_choice_json_has_every_number(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "mc.json"
    argv = [
        "eval",
        "--model",
        str(tiny_hf_dir),
        "--task",
        "multiple-choice",
        "--data",
        "multiple_choice_sample",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--limit", "5", "--batch-size", "7", "--output", str(out)])
    assert exit_info.value.code == 0
    assert "acc_norm" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert set(doc) >= {"task", "metrics", "model", "settings", "gpt2kit_version", "created", "items"}
    assert doc["task"]["kind"] == "multiple-choice" and len(doc["task"]["sha256"]) == 64
    assert doc["settings"]["batch_size"] == 7 and doc["settings"]["limit"] == 5
    assert len(doc["items"]) == 5 and all(len(it["logprobs"]) == 4 for it in doc["items"])
    for name in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n_items", "n_options"):
        assert doc[name] == doc["metrics"][name]


def test_acc_norm_divides_by_the_choices_characters_not_bytes(tmp_path, gpt2_tokenizer):
    """lm-eval's acc_norm: log-likelihood / len(choice) in characters, the delimiter left out.

    On a model with the same next-token distribution everywhere, an option's log-likelihood
    is a sum of known per-token values. "café" is one cheap token but 4 characters and 6
    bytes with its space; "the the the the" is four likelier tokens over 15 characters.
    Per byte "café" would win; per character the long option does.
    """
    choices = ["café", "the the the the", "über"]
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"context": "Pick:", "choices": choices, "label": 1}) + "\n", encoding="utf-8")
    task = load_task(path, kind="multiple-choice")
    result = evaluate_multiple_choice(fixed_distribution_model(), gpt2_tokenizer, task)

    log_z = math.log(4 + (V - 1))
    token_logprob = {THE: math.log(4) - log_z}  # every other token: -log_z
    logprobs = [sum(token_logprob.get(t, -log_z) for t in gpt2_tokenizer.encode(" " + c)) for c in choices]
    (item,) = result["items"]
    assert item["logprobs"] == pytest.approx(logprobs, rel=1e-5)
    by_chars = max(range(3), key=lambda j: logprobs[j] / len(choices[j]))
    by_bytes = max(range(3), key=lambda j: logprobs[j] / len((" " + choices[j]).encode("utf-8")))
    assert (by_chars, by_bytes) == (1, 0)  # the case tells the two definitions apart
    assert item["pred"] == max(range(3), key=logprobs.__getitem__) == 0
    assert item["pred_norm"] == by_chars
    assert result["metrics"]["acc"] == 0.0 and result["metrics"]["acc_norm"] == 1.0


def test_a_choice_longer_than_the_context_names_its_file_and_line(tmp_path, tiny_hf_dir, gpt2_tokenizer):
    path = tmp_path / "long.jsonl"
    rows = [
        {"context": "Fine:", "choices": ["a", "b"], "label": 0},
        {"context": "Too long:", "choices": ["short", "word " * 200], "label": 0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = load_task(path, kind="multiple-choice")
    with pytest.raises(DataError) as info:
        evaluate_multiple_choice(GPT2.from_pretrained(tiny_hf_dir), gpt2_tokenizer, task)
    message = str(info.value)
    assert message.startswith(f"{path}:2: choice 1 is 201 tokens, longer than the model's context of 128")
    assert "shorten it" in message and "\n" not in message
