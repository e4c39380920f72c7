"""`gpt2kit generate` flags as a user runs them: devices, beams, special tokens, stop escapes,
--n and --logprobs, and the flag combinations it refuses."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_clean_error, gpt2kit, run_main
from conftest import scripted_model
from gpt2kit import Tokenizer, generate
from gpt2kit.cli.generate import unescape
from gpt2kit.generation.complete import complete
from gpt2kit.model import GPT2
from gpt2kit.model.checkpoint import load_tokenizer

EOT = 50256


def gen(capsys: pytest.CaptureFixture[str], model: Path, *args: str) -> tuple[int, str, str]:
    # float32: outputs are compared with the library's, which keeps the checkpoint's dtype
    # (--dtype auto would pick bf16 on a CPU with native bf16).
    return run_main(capsys, "generate", "--model", str(model), "--dtype", "float32", *args)


# --- devices --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_unknown_device_is_a_one_line_error(
    tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # `serve` takes --device through the same function (gpt2kit.device.pick_device).
    code, out, err = run_main(capsys, command, "--model", str(tiny_hf_dir), "--device", "foo")
    assert_clean_error(code, err, command, "--device foo: unknown device", "use cpu")
    assert out == "" and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tiny_hf_dir: Path) -> None:
    r = gpt2kit("generate", "--model", str(tiny_hf_dir), "--prompt", "Hi", "--device", "cuda")
    assert_clean_error(r.returncode, r.stderr, "generate", "--device cuda:", "--device cpu")
    assert r.stdout == "" and r.stderr.count("\n") == 1


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_mps_is_an_error(tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = gen(capsys, tiny_hf_dir, "--device", "mps")
    assert_clean_error(code, err, "generate", "--device mps: MPS is not available", "--device cpu")


# --- flags and combinations that are refused ------------------------------------------------


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--num-beams", "0"], "--num-beams must be >= 1"),
        (["--num-beams=-2"], "--num-beams must be >= 1"),
        (["--num-beams", "4", "--interactive"], "--interactive streams one sample"),
        (["--num-beams", "2", "--length-penalty", "nan"], "--length-penalty must be a finite number"),
        (["--num-beams", "2", "--length-penalty", "inf"], "--length-penalty must be a finite number"),
        (["--length-penalty=-inf"], "--length-penalty must be a finite number"),
        (["--n", "0"], "--n must be an integer >= 1"),
        (["--logprobs", "21"], "--logprobs must be an integer in [0, 20]"),
        (["--logprobs=-1"], "--logprobs must be an integer in [0, 20]"),
        (["--presence-penalty", "3"], "--presence-penalty must be in [-2, 2]"),
        (["--logit-bias", "5"], "--logit-bias takes ID=BIAS"),
        (["--logit-bias", "5=200"], "--logit-bias values must be numbers in [-100, 100]"),
        (["--logprobs", "2", "--num-beams", "3"], "--logprobs works with sampling"),
        (["--n", "2", "--num-beams", "3"], "--n works with sampling"),
        (["--n", "2", "--interactive"], "drop --n or --interactive"),
        (["--logprobs", "1", "--interactive"], "drop --logprobs or --interactive"),
        (["--top-k=-1"], "--top-k must be an integer >= 0 (0 = off)"),
        (["--stop", ""], "--stop ''"),
        (
            ["--min-tokens", "9", "--max-new-tokens", "4"],
            "--min-tokens must be an integer in [0, max_new_tokens=4]",
        ),
        (["--min-tokens", "2", "--num-beams", "2"], "--min-tokens works with sampling"),
        (["--ignore-eos", "--num-beams", "2"], "--ignore-eos works with sampling"),
        (["--prompt", "<|endoftext|>hello"], "add --allow-special"),
    ],
)
def test_refused_before_any_output(
    tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str], options: list[str], fragment: str
) -> None:
    code, out, err = gen(capsys, tiny_hf_dir, "--prompt", "Hello", *options)
    assert_clean_error(code, err, "generate", fragment)
    assert out == "", "nothing (not even the prompt) is printed before the error"
    assert err.count("\n") == 1


def test_length_penalty_must_be_finite_in_the_api(tiny_hf_dir: Path) -> None:
    from gpt2kit.errors import ConfigError

    model = GPT2.from_pretrained(tiny_hf_dir)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--length-penalty must be a finite number"):
            generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, num_beams=2, length_penalty=bad)


def test_top_k_zero_is_off(tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--prompt", "Hello", "--max-new-tokens", "8", "--seed", "3"]
    code, with_zero, err = gen(capsys, tiny_hf_dir, *args, "--top-k", "0")
    assert code == 0, err
    code, without, _ = gen(capsys, tiny_hf_dir, *args)
    assert with_zero == without


# --- special tokens in the prompt -----------------------------------------------------------


def test_allow_special_encodes_endoftext(tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "<|endoftext|>Hello"
    code, out, err = gen(capsys, tiny_hf_dir, "--prompt", prompt, "--allow-special",
                         "--temperature", "0", "--max-new-tokens", "8")  # fmt: skip
    assert code == 0, err
    tok = Tokenizer.gpt2()
    ids = [EOT, *tok.encode("Hello")]
    model = GPT2.from_pretrained(tiny_hf_dir)
    new = generate(model, torch.tensor([ids]), max_new_tokens=8, temperature=0)[0, len(ids) :].tolist()
    new = new[: new.index(EOT)] if EOT in new else new
    assert out == prompt + tok.decode(new) + "\n"
    # The text "<|endoftext|>" encoded as plain text would give other tokens (and other output).
    assert tok.encode(prompt, disallowed_special=()) != ids


def test_interactive_reports_a_special_token_and_goes_on(tiny_hf_dir: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [*gpt2kit_cmd(), "generate", "--model", str(tiny_hf_dir), "--interactive",
         "--max-new-tokens", "3", "--temperature", "0"],
        input="<|endoftext|>x\nHello\n",
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"},
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "error: the prompt contains the special token <|endoftext|>; add --allow-special" in r.stderr
    assert "<|endoftext|>x" not in r.stdout, "the refused prompt is not echoed"
    assert r.stderr.count(" tokens in ") == 1, "the next prompt still runs"


def gpt2kit_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "gpt2kit"]


# --- stop strings with escapes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        (r"\n", "\n"),
        (r"\n\n", "\n\n"),
        (r"\t|\r", "\t|\r"),
        (r"\\n", "\\n"),  # an escaped backslash, then a plain n
        (r"é\nü", "é\nü"),  # non-ASCII is kept as typed (unicode_escape would mangle it)
        (r"\u00e9\u4e2d", "é中"),
        (r"\q \u12 end\\", "\\q \\u12 end\\"),  # unknown or incomplete escapes stay as typed
        ("plain", "plain"),
    ],
)
def test_unescape(typed: str, meant: str) -> None:
    assert unescape(typed) == meant


@pytest.fixture(scope="module")
def newline_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose greedy output after "Hello" is " there\\nGeneral Kenobi ..."."""
    tok = Tokenizer.gpt2()
    ids = tok.encode("Hello there\nGeneral Kenobi, you are a bold one")
    path = tmp_path_factory.mktemp("newline")
    scripted_model([*ids[1:], *ids[-3:]]).save_pretrained(path, tokenizer=tok)
    return path


def test_stop_backslash_n_stops_at_a_newline(
    newline_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--prompt", "Hello", "--temperature", "0", "--max-new-tokens", "6"]
    code, out, err = gen(capsys, newline_model_dir, *args)
    assert code == 0, err
    assert out.startswith("Hello there\nGeneral"), "the model does write a newline"
    r = gpt2kit("generate", "--model", str(newline_model_dir), *args, "--stop", r"\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello there\n", "stops before the newline (the \\n after it is the CLI's)"
    # An escaped backslash is a literal backslash-n, which this text never contains.
    code, literal, _ = gen(capsys, newline_model_dir, *args, "--stop", r"\\n")
    assert code == 0 and literal == out
    # Beam search and --n cut at the same stop string.
    for extra in (["--num-beams", "2"], ["--logprobs", "0"]):
        code, cut, err = gen(capsys, newline_model_dir, *args, "--stop", r"\n", *extra)
        assert code == 0, err
        assert cut.startswith("Hello there\n") and "General" not in cut, extra


def test_help_shows_backslash_n_literally(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "generate", "--help")
    assert code == 0
    assert r"""--prompt $'Q: Why?\nA:' --stop '\n'""" in out
    assert r"\n is a newline" in " ".join(out.split())
    assert not any(line.rstrip().endswith("Why?") for line in out.splitlines()), "no real line break"


# --- --n and --logprobs ---------------------------------------------------------------------


def test_n_samples_equal_complete(tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = gen(capsys, tiny_hf_dir, "--prompt", "Once upon", "--max-new-tokens", "10",
                         "--n", "3", "--seed", "5", "--top-k", "40")  # fmt: skip
    assert code == 0, err
    model, tok = GPT2.from_pretrained(tiny_hf_dir), load_tokenizer(tiny_hf_dir)
    done = complete(model, tok, "Once upon", max_new_tokens=10, n=3, seed=5, top_k=40)
    assert len({c.text for c in done}) > 1, "three different samples"
    assert out == "".join(f"--- sample {j + 1}/3 ---\nOnce upon{c.text}\n" for j, c in enumerate(done))
    assert f"[{sum(len(c.token_ids) for c in done)} tokens in " in err
    # Sample 1 is the sample the streaming path prints for the same seed.
    code, streamed, _ = gen(capsys, tiny_hf_dir, "--prompt", "Once upon", "--max-new-tokens", "10",
                            "--seed", "5", "--top-k", "40")  # fmt: skip
    assert streamed == f"Once upon{done[0].text}\n"


QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def parse_table(lines: list[str]) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """Rows of the --logprobs table: (token, logprob, [(alternative, logprob), ...])."""
    rows = []
    for line in lines:
        token = QUOTED.match(line)
        assert token, line
        rest = line[token.end() :].split(None, 1)
        alts = [
            (json.loads(m.group(1)), float(m.group(2)))
            for m in re.finditer(r'("(?:[^"\\]|\\.)*") (-?\d+\.\d{4})', rest[1] if len(rest) > 1 else "")
        ]
        rows.append((json.loads(token.group(0)), float(rest[0]), alts))
    return rows


def test_logprobs_table_equals_complete(tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = gen(capsys, tiny_hf_dir, "--prompt", "Hello world", "--max-new-tokens", "6",
                         "--logprobs", "2", "--seed", "1")  # fmt: skip
    assert code == 0, err
    model, tok = GPT2.from_pretrained(tiny_hf_dir), load_tokenizer(tiny_hf_dir)
    [c] = complete(model, tok, "Hello world", max_new_tokens=6, seed=1, logprobs=2)
    lines = out.splitlines()
    assert lines[0] == "Hello world" + c.text
    assert lines[1].split() == ["token", "logprob", "top", "2"]
    rows = parse_table(lines[2:])
    assert len(rows) == len(c.token_ids)
    for (token, lp, alts), tid, want_lp, top in zip(
        rows, c.token_ids, c.token_logprobs, c.top_logprobs, strict=True
    ):
        assert token == tok.decode_tokens([tid])[0]
        assert lp == round(want_lp, 4)
        assert alts == [(tok.decode_tokens([a])[0], round(v, 4)) for a, v in top.items()]
        assert len(alts) == 2 and alts[0][1] >= alts[1][1] and alts[0][1] >= lp


def test_n_with_logprobs_prints_a_table_per_sample(
    tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = gen(capsys, tiny_hf_dir, "--prompt", "Hi", "--max-new-tokens", "3",
                         "--n", "2", "--logprobs", "0", "--seed", "0", "--temperature", "0")  # fmt: skip
    assert code == 0, err
    model, tok = GPT2.from_pretrained(tiny_hf_dir), load_tokenizer(tiny_hf_dir)
    done = complete(model, tok, "Hi", max_new_tokens=3, n=2, seed=0, temperature=0, logprobs=0)
    blocks = out.split("--- sample ")[1:]
    assert len(blocks) == 2
    for block, c in zip(blocks, done, strict=True):
        lines = block.splitlines()
        assert lines[1] == "Hi" + c.text and lines[2].split() == ["token", "logprob"]
        assert [lp for _, lp, _ in parse_table(lines[3:])] == [round(x, 4) for x in c.token_logprobs]


# --- the --compile claim --------------------------------------------------------------------


def test_ignore_eos_always_gives_max_new_tokens(
    tiny_hf_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for seed in ("1", "2", "3"):
        code, _, err = gen(
            capsys, tiny_hf_dir, "--prompt", "Hi", "--max-new-tokens", "6", "--seed", seed, "--ignore-eos"
        )
        assert code == 0, err
        assert "[6 tokens in" in err, err
