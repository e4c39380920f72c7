"""`generate` tasks: exact-match / contains scoring on scripted output, batching changes nothing."""

from __future__ import annotations

import json

import pytest

from conftest import scripted_model
from gpt2kit.cli import main
from gpt2kit.evals.generation import evaluate_generation, normalize
from gpt2kit.evals.tasks import load_task
from gpt2kit.model import GPT2


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_normalize():
    assert normalize("  The  Eiffel\tTower \n") == "the eiffel tower"
    assert normalize("STRASSE") == normalize("straße")  # case-folding, not just lower()


def test_exact_match_and_contains_on_scripted_output(tmp_path, gpt2_tokenizer):
    tok = gpt2_tokenizer
    prompts = ["Q: What is the capital of France?\nA:", "Q: What is the capital of Japan?\nA:"]
    n = len(tok.encode(prompts[0]))
    assert len(tok.encode(prompts[1])) == n  # same length: both rows see the same script positions
    # Whatever the prompt, greedy decoding then says " Paris,  France" and a new line, then more.
    answer = tok.encode(" Paris,  France\n The end")
    model = scripted_model([0] * (n - 1) + answer + [0] * 4)
    rows = [
        {"prompt": prompts[0], "answers": ["Paris"]},  # contained, not exact
        {"prompt": prompts[0], "answers": ["paris, FRANCE", "Lyon"]},  # exact after normalising
        {"prompt": prompts[1], "answers": ["Tokyo"]},  # neither
        {"prompt": prompts[1], "answers": ["The end"]},  # after the newline: cut, so neither
    ]
    task = load_task(write_jsonl(tmp_path / "qa.jsonl", rows), kind="generate")
    result = evaluate_generation(model, tok, task, max_new_tokens=8, batch_size=3)
    assert [it["prediction"] for it in result["items"]] == [" Paris,  France"] * 4
    assert [it["exact_match"] for it in result["items"]] == [False, True, False, False]
    assert [it["contains"] for it in result["items"]] == [True, True, False, False]
    assert result["metrics"]["exact_match"] == 0.25
    assert result["metrics"]["contains"] == 0.5


def test_batched_predictions_equal_one_at_a_time(tiny_hf_dir, gpt2_tokenizer):
    model = GPT2.from_pretrained(tiny_hf_dir)
    task = load_task("qa_sample", kind="generate").limit(6)
    kw = dict(shots=2, seed=5, max_new_tokens=6)
    batched = evaluate_generation(model, gpt2_tokenizer, task, batch_size=6, **kw)
    single = evaluate_generation(model, gpt2_tokenizer, task, batch_size=1, **kw)
    assert [it["prediction"] for it in batched["items"]] == [it["prediction"] for it in single["items"]]
    assert all("\n" not in it["prediction"] for it in batched["items"])


@pytest.mark.parametrize("task_name", ["qa_sample", "translate_sample"])
def test_cli_generate_task(tiny_hf_dir, tmp_path, capsys, task_name):
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(tiny_hf_dir), "--task", "generate", "--data", task_name]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--shots", "1", "--limit", "4", "--max-new-tokens", "4", "--output", str(out)])
    assert exit_info.value.code == 0
    table = capsys.readouterr().out
    assert "exact_match" in table and "contains" in table
    doc = json.loads(out.read_text())
    assert doc["task"]["n_items"] == 4 and len(doc["items"]) == 4
    assert doc["settings"]["shots"] == 1 and doc["settings"]["temperature"] == 0.0
    assert {k: doc[k] for k in doc["metrics"]} == doc["metrics"]  # every metric at the top level too
