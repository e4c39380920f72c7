"""TrainConfig: defaults, then a TOML file, then `--set key=value` overrides, with errors naming the key.

CI runs this file on Python 3.10 as well (scripts/test_py310.sh), where TOML is read with the
`tomli` package instead of the standard library's `tomllib`. That run installs only
pytest and tomli, not torch: the `__init__`s of gpt2kit and gpt2kit.training re-export
the model and the loop (and import torch), while the config code needs neither, so there
the two packages' folders are put on the import path without running their `__init__`s;
every module this file tests is the real one.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

if importlib.util.find_spec("torch") is None:  # the Python 3.10 run: see the docstring
    src = Path(__file__).resolve().parents[2] / "src"
    for name in ("gpt2kit", "gpt2kit.training"):  # their __init__s import torch
        package = types.ModuleType(name)
        package.__path__ = [str(src.joinpath(*name.split(".")))]
        sys.modules[name] = package

from gpt2kit.errors import ConfigError
from gpt2kit.training.config import TrainConfig, parse_override


def test_config_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('n_layer = 3\nlr = 1e-3\ndevice = "cpu"\ncompile = false\n')
    cfg = TrainConfig.load(path, overrides=["lr=3e-4", "max_steps=7", "init_from=runs/x/final"])
    assert (cfg.n_layer, cfg.lr, cfg.max_steps, cfg.device, cfg.init_from) == (
        3,
        3e-4,
        7,
        "cpu",
        "runs/x/final",
    )
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert TrainConfig.load(again) == cfg


def test_every_toml_value_kind_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "all.toml"
    path.write_text(
        "# a comment\n"
        "n_embd = 64\n"
        "n_head = 4\n"
        "weight_decay = 0.0\n"
        "grad_clip = 1_000.5\n"
        "compile = true\n"
        "data = 'runs/with \"quotes\"'\n"
        'device = "cpu"  # trailing comment\n'
    )
    cfg = TrainConfig.load(path)
    assert (cfg.n_embd, cfg.n_head, cfg.weight_decay, cfg.grad_clip) == (64, 4, 0.0, 1000.5)
    assert cfg.compile is True
    assert cfg.data == 'runs/with "quotes"' and cfg.device == "cpu"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("lr=3e-4", ("lr", 3e-4)),
        ("max_steps=500", ("max_steps", 500)),
        ("compile=true", ("compile", True)),
        ('data="a b"', ("data", "a b")),
        ("device=cuda", ("device", "cuda")),  # a bare word is a string
        ("init_from=runs/x/final", ("init_from", "runs/x/final")),
        (" n_layer = 2 ", ("n_layer", 2)),
    ],
)
def test_overrides_are_toml_values(item: str, expected: tuple) -> None:
    assert parse_override(item) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["n_layr=2"], "unknown key 'n_layr' in config; did you mean 'n_layer'"),
        (["max_steps=abc"], "max_steps must be an integer"),
        (["lr=-1"], "lr must be a finite number > 0"),
        (["batch_size=0"], "batch_size must be a positive integer"),
        (["n_embd=100", "n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
        (["dtype=fp8"], "dtype must be one of"),
        (["compile=maybe"], "compile must be true or false"),
        (["beta2=1.5"], "beta2 must be in [0, 1)"),
        (["noequals"], "--set expects key=value"),
        (["optimizer=sgd"], "optimizer must be one of adamw, muon, got 'sgd'"),
        (["schedule=linear"], "schedule must be one of cosine, wsd, got 'linear'"),
        (["muon_lr=0"], "muon_lr must be a finite number > 0"),
        (["muon_weight_decay=-0.1"], "muon_weight_decay must be a finite number >= 0"),
        (["muon_momentum=1.0"], "muon_momentum must be in [0, 1)"),
        (["muon_ns_steps=0"], "muon_ns_steps must be an integer from 1 to 99"),
        (["muon_adjust_lr_fn=none"], "muon_adjust_lr_fn must be one of original, match_rms_adamw"),
        (["decay_fraction=1.5"], "decay_fraction must be in (0, 1]"),
    ],
)
def test_config_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig.load(overrides=overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        TrainConfig.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_layer = 2\n")
    with pytest.raises(ConfigError, match="tables are not supported"):
        TrainConfig.load(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 1\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        TrainConfig.load(broken)


def test_toml_parser_for_this_python() -> None:
    """3.11+ uses the standard library; 3.10 the tomli package (declared for it in pyproject.toml)."""
    import gpt2kit.training.config as trainconfig

    expected = "tomllib" if sys.version_info >= (3, 11) else "tomli"
    assert trainconfig.tomllib.__name__ == expected
