"""`compile=` means one thing in the library, `gpt2kit generate` and `gpt2kit serve`:
None uses a saved step and never builds, True builds when none is saved, False is eager;
a step that can't be had is one warning and eager decoding, never an error.

No step is built here: the build is replaced by one that records its calls, or the C++
compiler is made missing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cli_helpers import run_main
from conftest import tiny_model
from gpt2kit import generate
from gpt2kit.cli._compiled import COMPILE_HELP, SERVE_COMPILE_HELP
from gpt2kit.errors import ConfigError
from gpt2kit.model.compiled import build

KW = dict(max_new_tokens=5, temperature=0, eos_token_id=-1)


@pytest.fixture()
def no_compiler():
    with torch._inductor.config.patch({"cpp.cxx": ("gpt2kit-no-such-c++",)}):
        yield


@pytest.fixture()
def builds(monkeypatch, tmp_path) -> list[int]:
    """The slots of every build asked for; each fails as a failed compile would."""
    calls: list[int] = []

    def record(model, slots, folder, phase):
        calls.append(slots)
        raise ConfigError("building the compiled decode step failed: (recorded by the test)")

    monkeypatch.setattr(build, "build_library", record)
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(tmp_path))
    return calls


def test_none_never_builds_true_does_false_never_asks(builds, caplog) -> None:
    model = tiny_model(seed=2)
    eager = generate(model, [[1, 2, 3]], compile=False, **KW)
    with caplog.at_level(logging.WARNING, logger="gpt2kit.model.compiled"):
        assert generate(model, [[1, 2, 3]], compile=None, **KW) == eager
        assert builds == [] and not caplog.records
        assert generate(model, [[1, 2, 3]], compile=True, **KW) == eager
    assert builds == [1]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == "building the compiled decode step failed: (recorded by the test): decoding eagerly"


def test_no_compiler_is_a_warning_and_eager_decoding(no_compiler, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(tmp_path))
    model = tiny_model(seed=2)
    with caplog.at_level(logging.WARNING, logger="gpt2kit.model.compiled"):
        got = generate(model, [[1, 2, 3]], compile=True, **KW)
        assert got == generate(model, [[1, 2, 3]], compile=True, **KW)  # warned once per model
    assert got == generate(model, [[1, 2, 3]], compile=False, **KW)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "needs a C++ compiler" in warning and warning.endswith(": decoding eagerly")


@pytest.mark.parametrize(("command", "text"), [("generate", COMPILE_HELP), ("serve", SERVE_COMPILE_HELP)])
def test_each_command_documents_its_meaning(capsys, command: str, text: str) -> None:
    # serve's neither-flag default differs (a background build where compiling pays), so it
    # has its own text; each must reach its --help whole.
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0
    assert "".join(text.split()) in "".join(out.split())  # argparse wraps lines anywhere


def test_generate_cli_compile_without_a_compiler_warns_and_decodes(
    no_compiler, tiny_hf_dir: Path, tmp_path, monkeypatch, capsys, caplog
) -> None:
    monkeypatch.setenv("GPT2KIT_CACHE_DIR", str(tmp_path))
    argv = ["generate", "--model", str(tiny_hf_dir), "--prompt", "Hello", "--max-new-tokens", "4"]
    argv += ["--temperature", "0", "--dtype", "float32"]
    with caplog.at_level(logging.WARNING, logger="gpt2kit.model.compiled"):
        code, out, err = run_main(capsys, *argv, "--compile")
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "needs a C++ compiler" in warnings[0], warnings
    code, eager, err = run_main(capsys, *argv, "--no-compile")
    assert code == 0 and out == eager, err
