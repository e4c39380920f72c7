"""Sliding-window perplexity equals the Hugging Face perplexity-guide loop on the same model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gpt2kit.checkpoint import load_model
from gpt2kit.cli import main
from gpt2kit.errors import ConfigError
from gpt2kit.evals.perplexity import evaluate_perplexity, windows
from gpt2kit.evals.tasks import builtin_task_dir

TEXT = (builtin_task_dir() / "perplexity_sample.txt").read_text(encoding="utf-8")


def hf_sliding_window_nll(hf, ids: list[int], *, max_length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity guide, run on the transformers model: (total NLL, tokens scored)."""
    input_all = torch.tensor([ids])
    seq_len = input_all.size(1)
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end  # may differ from stride on the last window
        input_ids = input_all[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss  # mean over the shifted, unmasked labels
        n_loss = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * n_loss
        n_scored += n_loss
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_scored


@pytest.mark.parametrize("stride", [37, 127])
def test_perplexity_equals_transformers_sliding_window(tiny_hf_dir, gpt2_tokenizer, stride):
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    ids = [gpt2_tokenizer.eot_token, *gpt2_tokenizer.encode_ordinary(TEXT)]
    assert len(ids) > 3 * 128  # several windows
    ref_nll, ref_n = hf_sliding_window_nll(hf, ids, max_length=128, stride=stride)
    assert ref_n == len(ids) - 1  # the reference, too, predicts every text token once

    model = load_model(tiny_hf_dir)
    result = evaluate_perplexity(model, gpt2_tokenizer, TEXT, stride=stride, batch_size=3)
    assert result["n_tokens"] == ref_n
    assert result["total_nll_nats"] == pytest.approx(ref_nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(ref_nll / ref_n), rel=1e-5)
    n_bytes = len(TEXT.encode("utf-8"))
    assert result["n_bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(ref_nll / math.log(2) / n_bytes, rel=1e-5)


def test_short_text_is_one_window(tiny_hf_dir, gpt2_tokenizer):
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    text = "Hello world, this is a short text."
    ids = [gpt2_tokenizer.eot_token, *gpt2_tokenizer.encode_ordinary(text)]
    with torch.no_grad():
        ref = float(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    result = evaluate_perplexity(load_model(tiny_hf_dir), gpt2_tokenizer, text)
    assert result["n_windows"] == 1 and result["stride"] == 64
    assert result["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 64, 65, 200, 257])
@pytest.mark.parametrize("stride", [1, 7, 32, 63])
def test_windows_score_every_token_exactly_once(n, stride):
    scored = []
    for begin, prev_end, end in windows(n, context=64, stride=stride):
        assert end - begin <= 64 and begin % stride == 0
        scored += range(max(prev_end, begin + 1), end)
    assert scored == list(range(1, n))


def test_stride_must_leave_context(tiny_hf_dir, gpt2_tokenizer):
    model = load_model(tiny_hf_dir)
    for stride in (0, 128, 500):
        with pytest.raises(ConfigError, match="--stride"):
            evaluate_perplexity(model, gpt2_tokenizer, TEXT, stride=stride)


def test_cli_writes_results_json(tiny_hf_dir, gpt2_tokenizer, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(tiny_hf_dir), "--task", "perplexity", "--data", str(data)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--stride", "40", "--output", str(out)])
    assert exit_info.value.code == 0
    assert "bits_per_byte" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    expected = evaluate_perplexity(load_model(tiny_hf_dir), gpt2_tokenizer, TEXT, stride=40)
    assert doc["metrics"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert doc["metrics"]["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-6)
    assert doc["settings"]["stride"] == 40
    import hashlib

    assert doc["task"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert doc["model"]["n_params"] > 0 and doc["gpt2kit_version"]
