"""Int8 weight-only quantization: per-channel rounding, close logits, generation and the CLI flag."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_model
from gpt2kit import generate
from gpt2kit.quantize import Int8Linear, quantize_int8


def test_int8_linear_rounds_per_channel() -> None:
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.27, -0.635, 0.0, 0.01], [100.0, 50.0, -25.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.5, -1.0]))
    q = Int8Linear(lin)
    # Row scales max|w| / 127: 0.01 and 100/127; 0.01 / 0.01 = 1 step, -0.635 -> -63.5 -> -64.
    assert q.weight.tolist() == [[127, -64, 0, 1], [127, 64, -32, 0]]
    torch.testing.assert_close(q.scale, torch.tensor([0.01, 100 / 127]))
    x = torch.randn(3, 4)
    torch.testing.assert_close(q(x), x @ q.dequantized().T + lin.bias, rtol=1e-5, atol=1e-5)


def test_quantized_model_stays_close_and_generates() -> None:
    model = tiny_model(seed=5)
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)
        quantize_int8(model)
        out = model(ids).logits.log_softmax(-1)
    assert isinstance(model.h[0].attn.c_attn, Int8Linear)
    # Rounding to 1/254 of each row's range moves the log-probs a little, not a lot.
    err = (out - ref).abs().max().item()
    assert 0 < err < 0.05, err
    gen = generate(model, ids[:, :5], max_new_tokens=6, temperature=0)
    assert gen.shape == (2, 11)


def test_cli_quantize_flag(tiny_hf_dir, capsys: pytest.CaptureFixture[str]) -> None:
    from gpt2kit.cli import main

    argv = ["generate", "--model", str(tiny_hf_dir), "--prompt", "Hello", "--max-new-tokens", "5"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--temperature", "0", "--quantize", "int8"])
    assert exit_.value.code == 0
    out = capsys.readouterr()
    assert out.out.startswith("Hello")
    assert "tokens/s" in out.err
