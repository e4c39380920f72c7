"""Beam search equals transformers' `generate(num_beams=..., do_sample=False)` token for token."""

from __future__ import annotations

import tempfile

import pytest
import torch

from conftest import hf_model
from gpt2kit import GPT2, GPT2Config, generate
from gpt2kit.errors import ConfigError
from gpt2kit.generation.beam import beam_search


@pytest.fixture(scope="module", params=[0, 1])
def pair(request):
    """A tiny vocabulary (eos = 5 of 6 ids) so beams often end early, exercising the finished set."""
    theirs = hf_model(seed=request.param, vocab_size=6, n_positions=48)
    with torch.no_grad():
        theirs.transformer.wte.weight.mul_(40)  # peaked distributions: eos wins sometimes, not always
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours = GPT2.from_pretrained(d).eval()
    return ours, theirs


@pytest.mark.parametrize(
    ("max_new", "num_beams", "length_penalty", "early_stopping"),
    [
        (1, 4, 1.0, False),
        (12, 4, 1.0, False),
        (30, 4, 1.0, False),
        (30, 4, 2.0, True),
        (30, 3, 0.5, "never"),
        (30, 4, -1.0, False),
        (20, 2, 1.0, True),
    ],
)
def test_beam_search_matches_transformers(pair, max_new, num_beams, length_penalty, early_stopping) -> None:
    ours, theirs = pair
    ids = torch.tensor([[0, 1, 2, 3], [3, 3, 1, 0], [2, 0, 4, 1]])
    ref = theirs.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        num_beams=num_beams,
        do_sample=False,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        pad_token_id=5,
    )
    out = generate(
        ours,
        ids,
        max_new_tokens=max_new,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    assert out.tolist() == ref.tolist()


def test_beam_search_on_the_real_vocabulary(tiny_hf_dir) -> None:
    from transformers import AutoModelForCausalLM

    ours = GPT2.from_pretrained(tiny_hf_dir)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    ids = torch.tensor([[15496, 995, 11, 428]])
    ref = theirs.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, num_beams=4, do_sample=False
    )
    assert generate(ours, ids, max_new_tokens=16, num_beams=4).tolist() == ref.tolist()


def test_beam_search_list_input_and_errors(pair) -> None:
    ours, _ = pair
    alone = generate(ours, [[0, 1, 2]], max_new_tokens=6, num_beams=3)
    assert alone[0][:3] == [0, 1, 2]
    assert alone == generate(ours, [[0, 1, 2]], max_new_tokens=6, num_beams=3)
    with pytest.raises(ConfigError, match="beam search"):
        generate(ours, [[0]], max_new_tokens=2, num_beams=2, n=2)
    with pytest.raises(ConfigError, match="early_stopping"):
        generate(ours, [[0]], max_new_tokens=2, num_beams=2, early_stopping="sometimes")


def test_cli_beam_and_sampling_flags(tiny_hf_dir, capsys: pytest.CaptureFixture[str]) -> None:
    from gpt2kit.cli import main

    argv = ["generate", "--model", str(tiny_hf_dir), "--prompt", "Hello", "--max-new-tokens", "6"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--num-beams", "3"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("Hello")
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--repetition-penalty", "0"])
    assert exit_.value.code == 2
    assert "--repetition-penalty must be" in capsys.readouterr().err


@pytest.mark.parametrize("penalty", [float("nan"), float("inf")])
def test_beam_search_refuses_a_non_finite_length_penalty(penalty: float) -> None:
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=16)).eval()
    with pytest.raises(ConfigError, match="--length-penalty must be a finite number"):
        beam_search(model, torch.tensor([[1, 2]]), max_new_tokens=2, num_beams=2, length_penalty=penalty)
