"""`gpt2kit train --help`: the keys it lists are TrainConfig's fields, with their defaults and help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli_helpers import run_main
from gpt2kit.training.config import TrainConfig, toml_value

DOCS = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def test_help_lists_every_key_with_its_default_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "train", "--help")
    assert code == 0 and "examples:" in out
    listed = out[out.index("keys (--set key=value") :]
    flat = " ".join(listed.split())  # help wrapped over lines reads as one
    for key, default, help in TrainConfig.settings():
        assert re.search(rf"^  {key} = {re.escape(toml_value(default))} ", listed, re.MULTILINE), key
        assert " ".join(help.split()) in flat, key
    # a default is what an empty config holds
    defaults = TrainConfig()
    assert all(getattr(defaults, key) == default for key, default, _ in TrainConfig.settings())


def test_docs_table_names_every_key() -> None:
    text = DOCS.read_text(encoding="utf-8")
    table = text[text.index("### Keys") : text.index("### What a step does")]
    documented = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert documented == {key for key, _, _ in TrainConfig.settings()}
