"""`gpt2kit tokenize` and `gpt2kit generate` as a user runs them: output, exit codes, errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_clean_error, gpt2kit, run_main
from gpt2kit import GPT2, Tokenizer, generate

# --- tokenize -------------------------------------------------------------------------------


def test_tokenize_text() -> None:
    r = gpt2kit("tokenize", "--text", "Hello world")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[15496, 995]\n2 tokens\n"


def test_tokenize_file_and_stdin_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "Ünïcödé 🙂 and\nnew lines\n"
    path = tmp_path / "in.txt"
    path.write_text(text, encoding="utf-8")
    code, out, _ = run_main(capsys, "tokenize", str(path), "--json")
    assert code == 0 and json.loads(out) == Tokenizer.gpt2().encode(text)
    r = gpt2kit("tokenize", "-", "--json", stdin=text)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == Tokenizer.gpt2().encode(text)


def test_tokenize_special_token(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "tokenize", "--text", "a<|endoftext|>")
    assert_clean_error(code, err, "tokenize", "<|endoftext|>", "--allow-special")
    code, out, _ = run_main(capsys, "tokenize", "--text", "<|endoftext|>", "--allow-special", "--json")
    assert code == 0 and json.loads(out) == [50256]


def test_tokenize_saved_tokenizer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    Tokenizer.gpt2().save(tmp_path)
    code, out, _ = run_main(
        capsys, "tokenize", "--tokenizer", str(tmp_path), "--text", "Hello world", "--json"
    )
    assert code == 0 and json.loads(out) == [15496, 995]


def test_tokenize_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    code, _, err = run_main(capsys, "tokenize", str(missing))
    assert_clean_error(code, err, "tokenize", str(missing), "no such file")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    code, _, err = run_main(capsys, "tokenize", str(latin1))
    assert_clean_error(code, err, "tokenize", "not UTF-8", "offset 3")
    code, _, err = run_main(capsys, "tokenize", str(tmp_path))
    assert_clean_error(code, err, "tokenize", "is a directory")
    code, _, err = run_main(capsys, "tokenize", "--tokenizer", str(tmp_path), "--text", "x")
    assert_clean_error(code, err, "tokenize", "vocab.json")
    # argparse's own usage errors also exit with 2.
    code, _, err = run_main(capsys, "tokenize")
    assert code == 2 and "required" in err
    code, _, err = run_main(capsys, "tokenize", "f.txt", "--text", "x")
    assert code == 2 and "not allowed with" in err


# --- generate -------------------------------------------------------------------------------


def test_generate_greedy_streams_the_continuation(
    tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(capsys, "generate", "--model", str(tiny_hf_dir), "--prompt", "Hello",
                              "--temperature", "0", "--max-new-tokens", "12")  # fmt: skip
    assert code == 0, err
    tok = Tokenizer.gpt2()
    model = GPT2.from_pretrained(tiny_hf_dir)
    ids = torch.tensor([tok.encode("Hello")])
    new = generate(model, ids, max_new_tokens=12, temperature=0)[0, ids.shape[1] :].tolist()
    new = new[: new.index(50256)] if 50256 in new else new
    assert out == "Hello" + tok.decode(new) + "\n"
    assert "tokens/s" in err and "Traceback" not in err


def test_generate_seed_is_reproducible(tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(tiny_hf_dir), "--prompt", "Once upon", "--max-new-tokens", "16"]
    r = gpt2kit(*args, "--seed", "7", "--top-k", "40")
    assert r.returncode == 0, r.stderr
    code, out, err = run_main(capsys, *args, "--seed", "7", "--top-k", "40")
    assert code == 0 and out == r.stdout
    assert err.startswith("[") and "tokens/s on cpu" in err
    code, other, _ = run_main(capsys, *args, "--seed", "8", "--top-k", "40")
    assert code == 0 and other != out and other.startswith("Once upon")


def test_generate_empty_prompt(tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(
        capsys, "generate", "--model", str(tiny_hf_dir), "--max-new-tokens", "5", "--temperature", "0"
    )
    assert code == 0
    model = GPT2.from_pretrained(tiny_hf_dir)
    new = generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=5, temperature=0)[
        0, 1:
    ].tolist()
    new = new[: new.index(50256)] if 50256 in new else new
    assert out == Tokenizer.gpt2().decode(new) + "\n"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--temperature", "-1"], "--temperature must be a number >= 0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-k=-1"], "--top-k must be an integer >= 0 (0 = off)"),
        (["--max-new-tokens", "-3"], "--max-new-tokens must be"),
        (["--prompt", "<|endoftext|>"], "add --allow-special"),
    ],
)
def test_generate_bad_options(
    tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str], options: list[str], fragment: str
) -> None:
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_hf_dir), *options)
    assert_clean_error(code, err, "generate", fragment)


def test_generate_bad_model_directories(
    tiny_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    code, _, err = run_main(capsys, "generate", "--model", str(missing), "--prompt", "x")
    assert_clean_error(code, err, "generate", "no such model directory")

    no_config = shutil.copytree(tiny_hf_dir, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    code, _, err = run_main(capsys, "generate", "--model", str(no_config), "--prompt", "x")
    assert_clean_error(code, err, "generate", str(no_config / "config.json"), "not found")

    truncated = shutil.copytree(tiny_hf_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_main(capsys, "generate", "--model", str(truncated), "--prompt", "x")
    assert_clean_error(code, err, "generate", str(weights), "truncated")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_generate_refuses_a_malicious_pickle(tiny_hf_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "evil"
    d.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_hf_dir / name, d / name)
    marker = tmp_path / "pwned"
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"wte.weight": Payload(marker)}, f)
    r = gpt2kit("generate", "--model", str(d), "--prompt", "x")
    assert_clean_error(r.returncode, r.stderr, "generate", str(d / "pytorch_model.bin"))
    assert r.stderr.count("\n") == 1, "one line"
    assert not marker.exists()


def test_generate_unknown_hub_id_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "generate", "--model", "some-org/not-there", "--prompt", "x")
    assert_clean_error(code, err, "generate", "'some-org/not-there'", "can't be downloaded")


@pytest.mark.parametrize("command", ["tokenize", "generate"])
def test_help_has_examples(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0
    assert "examples:" in out and f"gpt2kit {command} " in out
    assert out.startswith(f"usage: gpt2kit {command} ")


def test_help_in_a_real_process() -> None:
    r = gpt2kit("generate", "--help")
    assert r.returncode == 0
    assert "gpt2kit generate --model gpt2 --prompt" in r.stdout
