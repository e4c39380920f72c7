"""Sliding-window perplexity equals the Hugging Face perplexity-guide loop on the same model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gpt2kit.cli import main
from gpt2kit.errors import ConfigError
from gpt2kit.evals.perplexity import evaluate_perplexity, windows
from gpt2kit.evals.tasks import builtin_task_dir
from gpt2kit.model import GPT2

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

    model = GPT2.from_pretrained(tiny_hf_dir)
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
    result = evaluate_perplexity(GPT2.from_pretrained(tiny_hf_dir), gpt2_tokenizer, text)
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


def test_stride_must_fit_the_context(tiny_hf_dir, gpt2_tokenizer):
    model = GPT2.from_pretrained(tiny_hf_dir)
    for stride in (0, 129, 500):
        with pytest.raises(ConfigError, match=r"--stride must be in \[1, 128\]"):
            evaluate_perplexity(model, gpt2_tokenizer, TEXT, stride=stride)


@pytest.mark.parametrize("n", [1, 2, 5, 64, 65, 66, 129, 200, 257])
def test_stride_equal_to_context_gives_disjoint_blocks(n):
    """Every target block [p, p + 64) is fed [p - 1, p + 63): 64 inputs at most, each token scored once."""
    spans = windows(n, context=64, stride=64)
    scored = []
    for begin, prev_end, end in spans:
        assert prev_end == begin + 1 and end - 1 - begin <= 64
        scored += range(prev_end, end)
    assert scored == list(range(1, n))
    assert len(spans) == math.ceil((n - 1) / 64)


def lm_eval_rolling_nll(hf, ids: list[int], *, context: int) -> tuple[float, int]:
    """Disjoint blocks of `context` targets, each fed the token before it: (total NLL, tokens scored)."""
    nll, n_scored = 0.0, 0
    for p in range(1, len(ids), context):
        targets = ids[p : p + context]
        inputs = ids[p - 1 : p - 1 + len(targets)]
        with torch.no_grad():
            logprobs = hf(torch.tensor([inputs])).logits[0].log_softmax(-1)
        nll -= sum(float(logprobs[k, t]) for k, t in enumerate(targets))
        n_scored += len(targets)
    return nll, n_scored


def test_stride_equal_to_context_equals_lm_eval_rolling_windows(tiny_hf_dir, gpt2_tokenizer):
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    ids = [gpt2_tokenizer.eot_token, *gpt2_tokenizer.encode_ordinary(TEXT)]
    assert (len(ids) - 1) % 128 != 0  # a short last block too
    ref_nll, ref_n = lm_eval_rolling_nll(hf, ids, context=128)
    assert ref_n == len(ids) - 1

    result = evaluate_perplexity(
        GPT2.from_pretrained(tiny_hf_dir), gpt2_tokenizer, TEXT, stride=128, batch_size=2
    )
    assert result["n_tokens"] == len(ids) - 1
    assert result["n_windows"] == math.ceil((len(ids) - 1) / 128)
    assert result["total_nll_nats"] == pytest.approx(ref_nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(ref_nll / ref_n), rel=1e-5)
    # Not the overlapping windows' number: the blocks really are scored differently.
    overlapping = evaluate_perplexity(GPT2.from_pretrained(tiny_hf_dir), gpt2_tokenizer, TEXT, stride=127)
    assert overlapping["total_nll_nats"] != pytest.approx(ref_nll, rel=1e-5)


def test_cli_stride_equal_to_context_runs_and_above_it_exits_2(tiny_hf_dir, gpt2_tokenizer, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(tiny_hf_dir), "--task", "perplexity", "--data", str(data)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--stride", "128", "--output", str(out)])
    assert exit_info.value.code == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["stride"] == 128
    assert doc["n_tokens"] == len(gpt2_tokenizer.encode_ordinary(TEXT))
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--stride", "129"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "gpt2kit eval: error: --stride must be in [1, 128] (at most the model's context of 128; "
        "128 = disjoint windows), got 129; pass a stride in that range"
    ]


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
    expected = evaluate_perplexity(GPT2.from_pretrained(tiny_hf_dir), gpt2_tokenizer, TEXT, stride=40)
    assert doc["metrics"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert doc["metrics"]["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-6)
    assert doc["settings"]["stride"] == 40
    import hashlib

    assert doc["task"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert doc["model"]["n_params"] > 0 and doc["gpt2kit_version"]


def test_cli_json_has_the_metrics_at_the_top_level(tiny_hf_dir, tmp_path):
    """`doc["perplexity"]` works, and `metrics` is still there; the output's folder is created."""
    data = tmp_path / "text.txt"
    data.write_text("A short text to score. " * 5, encoding="utf-8")
    out = tmp_path / "new" / "folder" / "results.json"
    argv = ["eval", "--model", str(tiny_hf_dir), "--task", "perplexity", "--data", str(data)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", str(out)])
    assert exit_info.value.code == 0
    with open(out) as f:
        doc = json.load(f)
    assert doc["perplexity"] == doc["metrics"]["perplexity"] and doc["perplexity"] > 1
    assert doc["bits_per_byte"] == doc["metrics"]["bits_per_byte"] and doc["bits_per_byte"] > 0
    assert {k: doc[k] for k in doc["metrics"]} == doc["metrics"]
    assert list(doc)[:3] == ["task", "metrics", "perplexity"]


@pytest.mark.parametrize("bom", [False, True])
def test_cli_crlf_text_is_scored_byte_for_byte(tiny_hf_dir, gpt2_tokenizer, tmp_path, bom):
    """No newline conversion: n_bytes is the file's size (less a leading BOM, which is not text)."""
    text = "Hello world.\r\nSecond line\r\n"
    raw = text.encode("utf-8")
    data = tmp_path / "crlf.txt"
    data.write_bytes((b"\xef\xbb\xbf" if bom else b"") + raw)
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(tiny_hf_dir), "--task", "perplexity", "--data", str(data)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", str(out)])
    assert exit_info.value.code == 0
    doc = json.loads(out.read_text())
    assert doc["n_bytes"] == len(raw) == data.stat().st_size - 3 * bom
    assert doc["n_chars"] == len(text)
    expected = evaluate_perplexity(GPT2.from_pretrained(tiny_hf_dir), gpt2_tokenizer, text)
    assert doc["n_tokens"] == expected["n_tokens"] == len(gpt2_tokenizer.encode_ordinary(text))
    assert doc["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
