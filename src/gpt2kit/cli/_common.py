"""The flags every command that loads a model shares (--device, --dtype, --quantize), and the
load that reads them, saying on stderr what `auto` and `int8` picked on this machine."""

from __future__ import annotations

import argparse
import sys

# gpt2kit.device.DTYPE_CHOICES and gpt2kit.model.quantize.METHODS, spelled out so that `--help`
# needn't import torch (tests/model/test_quantize.py checks they agree).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_CHOICES = ("int8", "int8-dynamic", "int8-weight-only")

AUTO_DTYPE = (
    "auto: bfloat16 where the hardware computes it natively (a GPU with bf16; a CPU with "
    "AVX512-BF16, AMX or Arm BF16), else float32"
)
QUANTIZE_HELP = (
    "int8 weights, 4x smaller than float32; fast with --compile on CPUs with int8 dot products "
    "(VNNI, AMX) or native bf16. int8 picks int8-weight-only for bfloat16 on a CPU with native "
    "bf16, int8-dynamic (int8 activations too) for float32 on a CPU with VNNI/AMX, else "
    "int8-weight-only (smaller, not faster)"
)


def add_flags(p: argparse.ArgumentParser, *, dtype_default: str = "auto") -> None:
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (CUDA, else MPS, else CPU)"
    )
    p.add_argument(
        "--dtype", default=dtype_default, choices=DTYPE_CHOICES, help=f"weights and compute; {AUTO_DTYPE}"
    )
    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)


def load(args: argparse.Namespace):
    """(model, device) as --model, --device, --dtype and --quantize say; the picks on stderr."""
    from gpt2kit.device import auto_dtype, pick_device, pick_dtype
    from gpt2kit.model import GPT2
    from gpt2kit.model.quantize import pick_scheme

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    picked = []
    if args.dtype == "auto":
        picked.append(f"[dtype auto: {_name(dtype)} ({auto_dtype(device)[1]})]")
    quantize = args.quantize
    if quantize == "int8":
        quantize, why = pick_scheme(device, dtype)
        picked.append(f"[quantize int8: {quantize} ({why})]")
    compile = getattr(args, "compile", True)  # eval has no --compile: nothing to advise
    # `generate` decodes eagerly unless --compile (or a saved step); `serve` only with --no-compile.
    if quantize is not None and (compile is False or (compile is None and args.command == "generate")):
        # torchao's int8 runs as separate ops when eager; inductor fuses them (benchmarks/README.md).
        picked.append("[int8 decodes faster than float32 only compiled: add --compile]")
    model = GPT2.from_pretrained(args.model, device=device, dtype=dtype, quantize=quantize)
    for line in picked:  # once the model loaded: a bad --model is an error line alone
        print(line, file=sys.stderr)
    return model, device


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
