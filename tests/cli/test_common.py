"""The flags of the commands that load a model are declared once (cli/_common.py) and read once."""

from __future__ import annotations

import argparse

import pytest

from cli_helpers import assert_clean_error, run_main
from gpt2kit.cli import build_parser

LOADERS = ("generate", "serve", "eval")


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def flag(parser: argparse.ArgumentParser, name: str) -> argparse.Action:
    return next(a for a in parser._actions if name in a.option_strings)


def declared(action: argparse.Action) -> tuple:
    return (action.help, action.choices, action.required, action.type, action.metavar)


@pytest.mark.parametrize("name", ["--model", "--device", "--dtype", "--quantize"])
def test_generate_serve_and_eval_declare_the_shared_flags_alike(name: str) -> None:
    parsers = commands()
    first, *others = [declared(flag(parsers[c], name)) for c in LOADERS]
    assert all(o == first for o in others), name
    assert flag(parsers["generate"], "--model").required


def test_defaults() -> None:
    parsers = commands()
    # eval scores in float32 unless asked: its numbers stay comparable across machines.
    assert [flag(parsers[c], "--dtype").default for c in LOADERS] == ["auto", "auto", "float32"]
    assert {flag(parsers[c], "--device").default for c in LOADERS} == {"auto"}
    assert {flag(parsers[c], "--quantize").default for c in LOADERS} == {None}


def test_quickstart_takes_the_same_devices() -> None:
    parsers = commands()
    assert declared(flag(parsers["quickstart"], "--device")) == declared(
        flag(parsers["generate"], "--device")
    )
    assert flag(parsers["quickstart"], "--device").default == "auto"


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "x"],
        ["serve"],
        ["eval", "--task", "lambada", "--data", "lambada_sample"],
    ],
)
def test_a_bad_device_is_the_same_one_line_error_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, _, err = run_main(capsys, *command, "--model", "no/such-model", "--device", "tpu")
    assert_clean_error(
        code, err, command[0], "--device tpu: unknown device; use cpu, cuda, cuda:N, mps or auto"
    )


def test_every_sampling_field_is_a_generate_flag_of_its_name(capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from gpt2kit.generation.config import SamplingConfig

    generate = commands()["generate"]
    for field in dataclasses.fields(SamplingConfig):
        action = flag(generate, "--" + field.name.replace("_", "-"))
        assert action.dest == field.name
    # A SamplingConfig error names the flag (cli._common.flag_error), before anything loads.
    code, _, err = run_main(capsys, "generate", "--model", "no/such-model", "--no-repeat-ngram-size", "-1")
    assert_clean_error(code, err, "generate", "--no-repeat-ngram-size ")
    code, _, err = run_main(
        capsys,
        "eval",
        "--model",
        "no/such-model",
        "--task",
        "generate",
        "--data",
        "qa_sample",
        "--temperature",
        "-1",
    )
    assert_clean_error(code, err, "eval", "--temperature must be")
