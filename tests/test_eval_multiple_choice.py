"""Multiple choice: acc / acc_norm from batched scores equal an independent per-option HF loop."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2kit.checkpoint import load_model
from gpt2kit.cli import main
from gpt2kit.evals.multiple_choice import evaluate_multiple_choice
from gpt2kit.evals.tasks import fewshot_prefix, load_task


def test_acc_and_acc_norm_equal_an_unbatched_transformers_loop(tiny_hf_dir, gpt2_tokenizer):
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    task = load_task("multiple_choice_sample", kind="multiple-choice").limit(10)
    result = evaluate_multiple_choice(
        load_model(tiny_hf_dir), gpt2_tokenizer, task, shots=1, seed=7, batch_size=6
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
            normed.append(total / len((" " + choice).encode("utf-8")))
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
