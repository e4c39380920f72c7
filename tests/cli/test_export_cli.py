"""`gpt2kit export`: GGUF files and ollama Modelfiles from a model directory, as a user runs it,
then `--model file.gguf` in the other commands."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_clean_error, gpt2kit, run_main
from conftest import tiny_model
from gpt2kit import GPT2
from gpt2kit.tokenizer.bpe import train_bpe

TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with its own trained BPE, as `gpt2kit train` leaves one."""
    tok = train_bpe([TEXT] * 40, vocab_size=290)
    model = tiny_model(
        seed=11, vocab_size=tok.n_vocab, bos_token_id=tok.eot_token, eos_token_id=tok.eot_token
    )
    path = tmp_path_factory.mktemp("bpe-model")
    model.save_pretrained(path, tokenizer=tok)
    return path


def test_export_ollama_and_use_the_file(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ollama" / "tiny-f32.gguf"
    done = gpt2kit(
        "export", "--model", str(model_dir), "--format", "ollama", "--type", "f32", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(out), str(out.parent / "Modelfile")]
    assert "Writing" not in done.stderr  # the gguf writer's INFO lines are quiet
    assert (out.parent / "Modelfile").read_text() == (
        'FROM ./tiny-f32.gguf\nTEMPLATE "{{ .Prompt }}"\nPARAMETER num_ctx 64\nPARAMETER stop "<|endoftext|>"\n'
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "tiny-f32.gguf"]

    # --model file.gguf: the same greedy text as the directory, and the same token ids.
    greedy = ("--prompt", "ROMEO: But", "--max-new-tokens", "12", "--temperature", "0", "--dtype", "float32")
    texts = []
    for model in (model_dir, out):
        code, stdout, err = run_main(capsys, "generate", "--model", str(model), *greedy)
        assert code == 0, err
        texts.append(stdout)
    assert texts[0] == texts[1] and len(texts[0]) > len("ROMEO: But")
    outs = [
        run_main(capsys, "tokenize", "--tokenizer", str(t), "--text", TEXT, "--json")[1]
        for t in (model_dir, out)
    ]
    assert outs[0] == outs[1]


def test_export_gguf_back_to_a_directory(model_dir: Path, tmp_path: Path, capsys) -> None:
    gguf_path = tmp_path / "m.gguf"
    assert (
        run_main(capsys, "export", "--model", str(model_dir), "--type", "f32", "--out", str(gguf_path))[0]
        == 0
    )
    code, _, err = run_main(
        capsys, "export", "--model", str(gguf_path), "--format", "hf", "--out", str(tmp_path / "d")
    )
    assert code == 0, err
    ids = torch.tensor([[1, 50, 200, 7]])
    with torch.no_grad():
        want = GPT2.from_pretrained(model_dir)(ids).logits
        got = GPT2.from_pretrained(tmp_path / "d")(ids).logits
    assert torch.equal(got, want)
    assert (tmp_path / "d" / "vocab.json").read_text() == (model_dir / "vocab.json").read_text()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--model", "no/such/dir", "--out", "x.gguf"], ["no/such/dir: no such model directory"]),
        (["--out", "m.bin"], ["--out m.bin: name a .gguf file, e.g. --out m.gguf"]),
    ],
    ids=["missing-dir", "not-gguf-name"],
)
def test_bad_input_is_a_one_line_error(
    model_dir: Path, capsys, args: list[str], fragments: list[str]
) -> None:
    if "--model" not in args:
        args = ["--model", str(model_dir), *args]
    code, _, err = run_main(capsys, "export", *args)
    assert_clean_error(code, err, "export", *fragments)
    assert len(err.strip().splitlines()) == 1


def test_unknown_type_is_refused(model_dir: Path, capsys) -> None:
    code, _, err = run_main(capsys, "export", "--model", str(model_dir), "--type", "q4_0", "--out", "x.gguf")
    assert code == 2 and "invalid choice: 'q4_0'" in err and "Traceback" not in err


def test_a_non_gpt2_gguf_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for command in (["generate", "--prompt", "x"], ["export", "--out", str(tmp_path / "o.gguf")]):
        code, _, err = run_main(capsys, command[0], "--model", str(tmp_path / "llama.gguf"), *command[1:])
        assert_clean_error(code, err, command[0], "architecture 'llama'; gpt2kit reads only GPT-2 ('gpt2')")
        assert len(err.strip().splitlines()) == 1


def test_killed_mid_write_leaves_no_partial_file(tmp_path: Path) -> None:
    """SIGKILL while the GGUF is being written: the target is the previous file or absent, never half."""
    big = tiny_model(
        vocab_size=50257, n_embd=256, n_head=4, n_layer=2, bos_token_id=50256, eos_token_id=50256
    )
    big.save_pretrained(tmp_path / "big")  # 13M parameters: an f32 export writes ~53 MB
    out = tmp_path / "out" / "big.gguf"
    out.parent.mkdir()
    out.write_bytes(b"the previous export")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt2kit",
            "export",
            "--model",
            str(tmp_path / "big"),
            "--type",
            "f32",
            "--out",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in out.parent.iterdir()):
        assert proc.poll() is None, f"exited before writing: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == -signal.SIGKILL:  # the kill landed mid-write (the usual case)
        assert out.read_bytes() == b"the previous export"
    else:  # the write finished first: then the file is whole
        assert proc.returncode == 0
        assert GPT2.from_pretrained(out).config.n_embd == 256
