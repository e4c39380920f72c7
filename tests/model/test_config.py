"""GPT2Config: presets, validation with helpful errors, config.json both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt2kit import GPT2Config
from gpt2kit.errors import ConfigError
from gpt2kit.model.config import PRESETS


def test_defaults_are_gpt2_small() -> None:
    cfg = GPT2Config()
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (
        50257,
        1024,
        768,
        12,
        12,
    )
    assert cfg == GPT2Config.from_name("gpt2")
    assert (cfg.head_size, cfg.inner_size, cfg.wte_rows) == (64, 3072, 50257)
    assert cfg.activation_function == "gelu_new" and cfg.layer_norm_epsilon == 1e-5


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("gpt2", (12, 768, 12)),
        ("gpt2-medium", (24, 1024, 16)),
        ("gpt2-large", (36, 1280, 20)),
        ("gpt2-xl", (48, 1600, 25)),
    ],
)
def test_presets(name: str, shape: tuple[int, int, int]) -> None:
    cfg = GPT2Config.from_name(name)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == shape
    assert GPT2Config.from_name(f"openai-community/{name}") == cfg
    assert GPT2Config.from_name(name, n_positions=256).n_positions == 256


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown model size 'gpt3'") as e:
        GPT2Config.from_name("gpt3")
    for name in PRESETS:
        assert name in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_embd=30, n_head=4), r"divisible by n_head \(4\); try n_head=[35]$"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=-1), "vocab_size must be a positive integer"),
        (dict(n_head=True), "n_head must be a positive integer"),
        (dict(n_positions=2.5), "n_positions must be a positive integer"),
        (dict(n_inner=0), "n_inner must be positive"),
        (dict(activation_function="relu"), "use one of gelu_new"),
        (dict(position_embedding="rotary"), "position_embedding must be one of"),
        (dict(vocab_size=100, padded_vocab_size=64), r"must be >= vocab_size \(100\); e.g. 128"),
        (dict(resid_pdrop=1.0), r"resid_pdrop must be in \[0, 1\)"),
        (dict(attn_pdrop=-0.1), "attn_pdrop must be in"),
    ],
)
def test_invalid_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        GPT2Config(**kwargs)
    assert "\n" not in str(e.value)


def test_replace_validates() -> None:
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=64)
    assert cfg.replace(n_layer=3).n_layer == 3
    with pytest.raises(ConfigError):
        cfg.replace(n_head=3)


def test_hf_dict_round_trip() -> None:
    cfg = GPT2Config(
        vocab_size=1000, n_positions=128, n_embd=64, n_layer=3, n_head=4, n_inner=100,
        padded_vocab_size=1024, position_embedding="sinusoidal", layer_norm_epsilon=1e-6,
    )  # fmt: skip
    d = cfg.to_hf_dict()
    assert d["model_type"] == "gpt2" and d["architectures"] == ["GPT2LMHeadModel"]
    assert GPT2Config.from_hf_dict(json.loads(json.dumps(d))) == cfg


def test_transformers_reads_our_config_and_we_read_its() -> None:
    import transformers

    cfg = GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=3, n_head=4)
    theirs = transformers.GPT2Config(**cfg.to_hf_dict())
    assert (theirs.n_embd, theirs.n_layer, theirs.n_head, theirs.n_positions) == (64, 3, 4, 128)
    assert theirs.activation_function == "gelu_new" and theirs.layer_norm_epsilon == 1e-5
    assert GPT2Config.from_hf_dict(theirs.to_dict()) == cfg
    # transformers' defaults are GPT-2 small, as ours are.
    assert GPT2Config.from_hf_dict(transformers.GPT2Config().to_dict()) == GPT2Config()


def test_old_config_with_n_ctx_only() -> None:
    cfg = GPT2Config.from_hf_dict({"n_ctx": 512, "n_embd": 64, "n_head": 2, "n_layer": 1})
    assert cfg.n_positions == 512


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),
        ({"model_type": "gpt_neo"}, "model_type 'gpt_neo'"),
    ],
)
def test_unsupported_variants_are_refused(flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GPT2Config.from_hf_dict(flags)


def test_json_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    with pytest.raises(ConfigError, match=r"config\.json not found") as e:
        GPT2Config.from_json_file(path)
    assert str(path) in str(e.value)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        GPT2Config.from_json_file(path)
    assert str(path) in str(e.value)
    path.write_text('{"n_embd": 64, "n_head": 3}')
    with pytest.raises(ConfigError, match="divisible") as e:
        GPT2Config.from_json_file(path)
    assert str(path) in str(e.value)
    path.write_text(json.dumps(GPT2Config(n_layer=1).to_hf_dict()))
    assert GPT2Config.from_json_file(path) == GPT2Config(n_layer=1)
