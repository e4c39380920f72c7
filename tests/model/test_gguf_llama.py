"""gpt2kit's GGUF files in the real llama.cpp (slow: needs llama-cpp-python built from source).

Skipped unless $GPT2KIT_LLAMA_PYTHON names a Python that imports llama_cpp (its own virtual
environment; benchmarks/README.md, "GGUF in llama.cpp", has the recipe). llama.cpp runs in that
Python, in a subprocess, through benchmarks/llama_gguf_runner.py. Tiny models here; the full-size
check (gpt2 124M, the quick start's model) is benchmarks/check_gguf.py.

    GPT2KIT_LLAMA_PYTHON=/path/to/llama-venv/bin/python pytest -m slow tests/model/test_gguf_llama.py
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import shakespeare_plays, tiny_model
from gpt2kit import GPT2, Tokenizer
from gpt2kit.tokenizer.bpe import train_bpe

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "llama_gguf_runner.py"
TYPES = ["f32", "f16", "bf16", "q8_0"]


@pytest.fixture(scope="module")
def llama_python() -> str:
    python = os.environ.get("GPT2KIT_LLAMA_PYTHON")
    if not python:
        pytest.skip("set GPT2KIT_LLAMA_PYTHON to a Python with llama_cpp to run llama.cpp checks")
    done = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"{python} can't import llama_cpp: {done.stderr.strip().splitlines()[-1:]}")
    return python


def llama(python: str, **request) -> dict:
    done = subprocess.run([python, str(RUNNER)], input=json.dumps(request), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def play_lines(every: int = 40) -> list[str]:
    lines = []
    for play in shakespeare_plays()[:12]:
        lines += [x for x in play.read_text(encoding="utf-8").splitlines() if x.strip()][::every]
    return lines


@pytest.fixture(scope="module", params=["bpe", "gpt2"])
def exported(request, tmp_path_factory: pytest.TempPathFactory):
    """(model, tokenizer, {type: file}) for a BPE trained on the plays, and for GPT-2's vocabulary."""
    tok = train_bpe(play_lines(every=3), vocab_size=512) if request.param == "bpe" else Tokenizer.gpt2()
    eot = tok.eot_token
    model = tiny_model(seed=2, vocab_size=tok.n_vocab, n_embd=64, n_head=4, n_positions=128,
                       bos_token_id=eot, eos_token_id=eot)  # fmt: skip
    with torch.no_grad():  # larger weights than GPT-2's init: decisive logits, so greedy is stable
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            else:
                p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp(f"llama-{request.param}")
    for type in TYPES:
        model.save_gguf(out / f"{type}.gguf", type=type, tokenizer=tok)
    return model, tok, {type: out / f"{type}.gguf" for type in TYPES}


@torch.no_grad()
def greedy(model: GPT2, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("type", TYPES)
def test_llama_cpp_loads_and_follows_gpt2kit(llama_python: str, exported, type: str) -> None:
    model, tok, files = exported
    prompt = tok.encode("ROMEO:\nBut soft, what light")
    got = llama(llama_python, model=str(files[type]), n_ctx=128, prompt=prompt, new_tokens=32, logits=True)
    assert got["n_vocab"] == tok.n_vocab and got["n_ctx_train"] == 128
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0, -1]
    diff = (torch.tensor(got["first_logits"]) - want).abs().max().item()
    # A fraction of the logits' std. Even f32 differs by ~0.15%: ggml's CPU GELU reads an
    # fp16 table (GGML_GELU_FP16), so llama.cpp's f32 is not float32 arithmetic throughout.
    bound = {"f32": 0.01, "f16": 0.02, "bf16": 0.1, "q8_0": 0.1}[type] * want.std().item()
    assert diff <= bound, (type, diff, bound)
    if type == "f32":
        assert got["greedy"] == greedy(model, prompt, 32)


def test_llama_cpp_tokenizes_the_plays_as_gpt2kit(llama_python: str, exported) -> None:
    _, tok, files = exported
    lines = play_lines()
    got = llama(llama_python, model=str(files["q8_0"]), n_ctx=128, texts=lines)["tokens"]
    want = [tok.encode(line) for line in lines]
    wrong = [line for line, a, b in zip(lines, got, want, strict=True) if a != b]
    assert not wrong, f"{len(wrong)}/{len(lines)} lines differ, e.g. {wrong[:3]}"
