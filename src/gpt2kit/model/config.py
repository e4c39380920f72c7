"""GPT2Config: the model's shape and options, with Hugging Face's key names.

`config.json` files written by `transformers` load directly (`from_hf_dict`) and ours load
back into `transformers` (`to_hf_dict`), so one dataclass serves both worlds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gpt2kit.errors import ConfigError

# The activations GPT-2 checkpoints use. "gelu_new" is the tanh approximation of the paper.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
ACTIVATIONS = (*TANH_GELUS, "gelu")
POSITION_EMBEDDINGS = ("learned", "sinusoidal")


@dataclass
class GPT2Config:
    """Shape and options of a GPT-2 model.

    >>> GPT2Config.from_name("gpt2").n_layer
    12
    >>> GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=1000).head_size
    32
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    initializer_range: float = 0.02
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # Rows of wte; a multiple of 64 (50304 for GPT-2) is faster on GPUs. Logits are always
    # cut back to vocab_size, so padded ids can never be predicted or sampled.
    padded_vocab_size: int | None = None
    # "sinusoidal" replaces the learned wpe with the fixed table of "Attention Is All You Need".
    position_embedding: str = "learned"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_head={_nearest_divisor(self.n_embd, self.n_head)}"
            )
        if self.n_inner is not None and self.n_inner < 1:
            raise ConfigError(f"n_inner must be positive or None, got {self.n_inner!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"use one of {', '.join(ACTIVATIONS)}"
            )
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ConfigError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}"
            )
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ConfigError(
                f"padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size "
                f"({self.vocab_size}); e.g. {math.ceil(self.vocab_size / 64) * 64}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {p!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def wte_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPT2Config:
        """A published size: "gpt2", "gpt2-medium", "gpt2-large" or "gpt2-xl"."""
        key = name.removeprefix("openai-community/")
        if key not in PRESETS:
            raise ConfigError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def replace(self, **changes: Any) -> GPT2Config:
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json ------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> GPT2Config:
        """Read a `transformers` GPT-2 `config.json` dict (unknown keys are ignored)."""
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"config.json has model_type {model_type!r}; only 'gpt2' is supported")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise ConfigError(f"config.json sets {flag}=true, which GPT-2 checkpoints never use")
        if d.get("scale_attn_weights", True) is False:
            raise ConfigError("config.json sets scale_attn_weights=false; GPT-2 always scales")
        fields = {f.name for f in dataclasses.fields(cls)}
        # null means "the default" in published configs (e.g. "n_inner": null).
        kwargs = {k: v for k, v in d.items() if k in fields and v is not None}
        if "n_positions" not in d and "n_ctx" in d:  # very old configs
            kwargs["n_positions"] = d["n_ctx"]
        kwargs.update(d.get("gpt2kit", {}))
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` dict that `transformers.AutoConfig` loads as a GPT-2 config."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": self.activation_function,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.resid_pdrop,
            "embd_pdrop": self.embd_pdrop,
            "attn_pdrop": self.attn_pdrop,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "use_cache": True,
            # Options transformers doesn't have; the saved weights are already adapted.
            "gpt2kit": {
                "padded_vocab_size": self.padded_vocab_size,
                "position_embedding": self.position_embedding,
            },
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPT2Config:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found; a model directory needs one") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); re-save the model") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(d).__name__}")
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: bad config value ({e})") from None


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - near))


PRESETS: dict[str, dict[str, int]] = {
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # 124M
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},  # 350M
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},  # 774M
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},  # 1558M
}


def sinusoidal_table(n_positions: int, n_embd: int) -> Tensor:
    """The fixed position encoding of `position_embedding="sinusoidal"` (the Transformer paper's): sin on even dims, cos on odd, (n_positions, C)."""
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    div = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float64) * (-math.log(10000.0) / n_embd))
    table = torch.zeros(n_positions, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : n_embd // 2]
    return table.float()
