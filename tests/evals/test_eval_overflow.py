"""A model so wrong that exp(mean NLL) overflows a float: perplexity is inf, not a crash."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import hf_model, write_gpt2_tokenizer
from gpt2kit.cli import main


@pytest.fixture(scope="module")
def huge_logits_dir(tmp_path_factory):
    """GPT-2's vocabulary with the (tied) embeddings scaled by 1000: logits spread over thousands."""
    path = tmp_path_factory.mktemp("huge-logits")
    model = hf_model(seed=3, vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1000.0)
    model.save_pretrained(path)
    write_gpt2_tokenizer(path)
    return path


def run_eval(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_perplexity_overflow_is_inf_in_json_and_table(huge_logits_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("Hello world, this is a short text. And a few more words.", encoding="utf-8")
    out = tmp_path / "r.json"
    argv = ["--model", str(huge_logits_dir), "--task", "perplexity", "--data", str(data)]
    table = run_eval(capsys, *argv, "--output", str(out))
    assert '"perplexity": Infinity' in out.read_text()
    doc = json.loads(out.read_text())
    assert doc["nll_per_token"] > 709.8  # past what math.exp can return
    assert doc["perplexity"] == doc["metrics"]["perplexity"] == math.inf
    assert math.isfinite(doc["bits_per_byte"])
    assert any(line.split() == ["perplexity", "inf"] for line in table.splitlines())


def test_lambada_overflow_is_inf(huge_logits_dir, tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    rows = [{"context": "She opened the", "target": "door"}, {"context": "He ate the", "target": "apple"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "r.json"
    argv = ["--model", str(huge_logits_dir), "--task", "lambada", "--data", str(data)]
    table = run_eval(capsys, *argv, "--output", str(out))
    doc = json.loads(out.read_text())
    assert -sum(it["logprob"] for it in doc["items"]) / doc["n_target_tokens"] > 709.8
    assert doc["perplexity"] == doc["token_perplexity"] == math.inf
    assert doc["metrics"]["perplexity"] == math.inf
    assert any(line.split() == ["perplexity", "inf"] for line in table.splitlines())
