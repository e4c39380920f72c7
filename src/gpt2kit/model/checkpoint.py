"""Model directories in Hugging Face's GPT-2 format: load, save, download.

A directory holds `config.json`, `model.safetensors` (or a legacy `pytorch_model.bin`,
read with `weights_only=True` only), `vocab.json` + `merges.txt` and
`generation_config.json`. `transformers` stores the four projections as Conv1D [in, out];
we use `nn.Linear` [out, in], so exactly those are transposed on the way in and out.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gpt2kit import atomic
from gpt2kit.errors import CheckpointError, ConfigError
from gpt2kit.model.config import GPT2Config, sinusoidal_table
from gpt2kit.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# The only layout difference from transformers' GPT-2: Conv1D weights are [in, out].
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers old checkpoints carry (the causal mask and its fill value).
DROPPED = (["attn", "bias"], ["attn", "masked_bias"])
# Wrappers that prefix parameter names: transformers' GPT2LMHeadModel, torch.compile, DDP.
PREFIXES = ("transformer.", "_orig_mod.", "module.")
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_FILES = ["config.json", "vocab.json", "merges.txt", "generation_config.json"]


def is_gguf(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether `name_or_path` names a GGUF file (llama.cpp's format, `gpt2kit.model.gguf_file`)."""
    return str(name_or_path).lower().endswith(".gguf")


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A local model directory, downloading it first when given a hub id."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if is_gguf(path):
        raise CheckpointError(
            f"{path}: a GGUF file, not a model directory; this needs a directory: write one with "
            f"gpt2kit export --model {path} --format hf --out DIR"
        )
    if path.exists():
        raise CheckpointError(
            f"{path}: expected a model directory with config.json or a .gguf file, found a file"
        )
    name = str(name_or_path)
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    if looks_local or name.count("/") > 1:
        raise CheckpointError(f"{path}: no such model directory; check the path")
    return download(name)


def download(repo_id: str, *, revision: str | None = None) -> Path:
    """Fetch a GPT-2 model from the Hugging Face Hub (cached; honours HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - declared dependency
        raise CheckpointError("downloading needs huggingface_hub; pip install huggingface_hub") from None
    patterns = [*HUB_FILES, "model.safetensors"]
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        if not (local / "model.safetensors").is_file():  # old repos only have the pickle
            local = Path(
                snapshot_download(
                    repo_id, revision=revision, allow_patterns=[*HUB_FILES, "pytorch_model.bin"]
                )
            )
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id!r} is neither a local directory nor a model on the Hub") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id!r} is not a local directory and can't be downloaded (offline?); "
            "pass the path of a downloaded model directory"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"downloading {repo_id!r} failed: {str(e).splitlines()[0]}") from None
    return local


def weights_file(path: Path) -> Path:
    """The weights file `read_state_dict` reads: model.safetensors, else pytorch_model.bin."""
    st = path / "model.safetensors"
    return st if st.is_file() else path / "pytorch_model.bin"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The raw tensors of a model directory, safetensors preferred, never an unsafe unpickle."""
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    if st.is_file():
        try:
            return load_file(st)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{st}: not a valid safetensors file ({str(e).splitlines()[0]}); "
                "it may be truncated: re-download or re-save it"
            ) from None
    if pt.is_file():
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{pt}: refusing to unpickle non-weight objects ({str(e).splitlines()[0][:160]}); "
                "convert the checkpoint to model.safetensors with a trusted tool"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{pt}: unreadable weights file ({str(e).splitlines()[0]})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{pt}: expected a dict of tensors (a state_dict)")
        return state
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (transformer., _orig_mod., module.) from parameter names."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def from_hf_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module, *, source: str | os.PathLike[str] = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Map a transformers GPT-2 state dict onto `model`'s names and layouts.

    Every missing key, unexpected key and wrong shape is reported at once.
    """
    state = strip_prefixes(state)
    lm_head = state.pop("lm_head.weight", None)
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        if key.split(".")[-2:] in DROPPED:
            continue
        if key.endswith(TRANSPOSED):
            value = value.t()
        out[key] = value
    config = model.config
    if config.position_embedding == "sinusoidal":
        out.pop("wpe.weight", None)  # saved for transformers' sake; ours is computed
    wte = out.get("wte.weight")
    if wte is not None and config.padded_vocab_size and wte.shape[0] == config.vocab_size:
        pad = torch.zeros(config.padded_vocab_size - config.vocab_size, wte.shape[1], dtype=wte.dtype)
        out["wte.weight"] = torch.cat([wte, pad])
    if (
        lm_head is not None
        and wte is not None
        and lm_head.shape == wte.shape
        and not torch.equal(lm_head, wte)
    ):
        log.warning("%s: lm_head.weight differs from wte.weight; GPT-2 ties them, using wte", source)

    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    wrong = [
        f"{k} {tuple(out[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in out and out[k].shape != expected[k]
    ]
    problems = []
    if missing:
        problems.append(
            f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}")
    if problems:
        raise CheckpointError(f"{source}: weights don't match config.json; " + "; ".join(problems))
    return out


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict `transformers.GPT2LMHeadModel` expects (tied lm_head omitted)."""
    config = model.config
    quantization = getattr(model, "quantization", None)
    if quantization is not None:
        raise ConfigError(
            f"the model is quantized ({quantization}) and checkpoints hold float weights; "
            "save it before quantizing and pass quantize='int8' when loading it"
        )
    out = {}
    for key, value in strip_prefixes(model.state_dict()).items():
        value = value.detach()
        if key.endswith(TRANSPOSED):
            value = value.t()
        if key == "wte.weight":
            value = value[: config.vocab_size]
        out[f"transformer.{key}"] = value.contiguous().cpu()
    if config.position_embedding == "sinusoidal":
        # transformers has only learned positions; the fixed table as weights is exact.
        out["transformer.wpe.weight"] = sinusoidal_table(config.n_positions, config.n_embd).to(
            model.wte.weight.dtype
        )
    return out


def save_model(model: nn.Module, path: str | os.PathLike[str], *, tokenizer: Tokenizer | None = None) -> None:
    """Write `model` as a Hugging Face GPT-2 directory, every file atomically.

    The tokenizer files come from `tokenizer`, or GPT-2's when the vocabulary is GPT-2's size.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    if tokenizer is None and config.vocab_size == 50257:
        tokenizer = Tokenizer.gpt2()
    if tokenizer is not None and tokenizer.n_vocab != config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.n_vocab} tokens but the model's vocab_size is {config.vocab_size}"
        )
    with atomic.atomic_path(path / "model.safetensors") as tmp:
        save_file(to_hf_state_dict(model), tmp, metadata={"format": "pt"})
    atomic.write_text(path / "config.json", json.dumps(config.to_hf_dict(), indent=2) + "\n")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    atomic.write_text(path / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path, model_max_length=config.n_positions)


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer saved with a model (GPT-2's when the directory has none), or inside a GGUF file."""
    if is_gguf(name_or_path):
        from gpt2kit.tokenizer import gguf_vocab  # imports the gguf package: only when needed

        return gguf_vocab.read_tokenizer(name_or_path)
    path = resolve(name_or_path)
    if (path / "vocab.json").is_file():
        return Tokenizer.from_dir(path)
    config = GPT2Config.from_json_file(path / "config.json")
    if config.vocab_size != 50257:
        raise CheckpointError(
            f"{path}: no vocab.json + merges.txt, and vocab_size {config.vocab_size} is not GPT-2's; "
            "copy the tokenizer files the model was trained with into the directory"
        )
    return Tokenizer.gpt2()
