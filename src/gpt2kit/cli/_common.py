"""The flags every command that loads a model shares, declared once: --model (`add_model_flag`),
--device, --dtype and --quantize (`add_flags`; --device alone: `add_device_flag`); the one
load that reads them (`pick`, then `load`), saying on stderr what `auto` and `int8` picked on
this machine (the choices themselves are `gpt2kit.device`'s and `gpt2kit.model.quantize`'s);
and `flag_error`, a SamplingConfig error under its flag's name. (The compiled decode step
`generate --compile` and `serve` get is `gpt2kit.cli._compiled`'s.)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpt2kit.dtypes import DTYPE_CHOICES

if TYPE_CHECKING:  # only for annotations: `gpt2kit --help` must not import torch
    import torch

    from gpt2kit.errors import ConfigError
    from gpt2kit.generation.config import SamplingError
    from gpt2kit.model.gpt2 import GPT2

# gpt2kit.model.quantize.METHODS, spelled out so that `--help` needn't import torch
# (tests/model/test_quantize.py checks they agree).
QUANTIZE_CHOICES = ("int8", "int8-dynamic", "int8-weight-only")

DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (CUDA, else MPS, else CPU)"
AUTO_DTYPE = (
    "auto: bfloat16 where the hardware computes it natively (a GPU with bf16; a CPU with "
    "AVX512-BF16, AMX or Arm BF16), else float32"
)
QUANTIZE_HELP = (
    "int8 weights, 4x smaller than float32 and up to 2.5x faster to decode on CPU. int8 picks "
    "int8-weight-only (ATen's weight-only kernel, bf16 products; compiled agrees with eager "
    "to the numerics bounds, and greedy tokens may part at a near-tie); int8-dynamic "
    "quantizes the activations too (int8 x int8 products, fast only with --compile on CPUs "
    "with VNNI/AMX)"
)


def add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="model directory, GPT-2 .gguf file or Hugging Face hub id (e.g. gpt2)"
    )


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_flags(p: argparse.ArgumentParser, *, dtype_default: str = "auto") -> None:
    """--device, --dtype and --quantize."""
    add_device_flag(p)
    p.add_argument(
        "--dtype", default=dtype_default, choices=DTYPE_CHOICES, help=f"weights and compute; {AUTO_DTYPE}"
    )
    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)


def flag_error(e: SamplingError) -> ConfigError:
    """A SamplingConfig error as the CLI says it: the field's flag (`--max-new-tokens` for
    max_new_tokens: every sampling flag is its field's name), then the problem."""
    from gpt2kit.errors import ConfigError

    return ConfigError(f"--{e.field.replace('_', '-')} {e.message}")


@dataclass(frozen=True)
class Picks:
    """What --device, --dtype and --quantize come to on this machine, and the lines saying why."""

    device: torch.device
    dtype: torch.dtype
    quantize: str | None
    notes: tuple[str, ...]


def pick(args: argparse.Namespace) -> Picks:
    """The device, dtype and int8 scheme the flags ask for, decided without loading anything,
    so a bad --device fails at once (ConfigError)."""
    from gpt2kit.device import auto_dtype, pick_device, pick_dtype
    from gpt2kit.model.quantize import pick_scheme

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    notes = []
    if args.dtype == "auto":
        notes.append(f"[dtype auto: {_name(dtype)} ({auto_dtype(device)[1]})]")
    quantize = args.quantize
    if quantize == "int8":
        quantize, why = pick_scheme(device, dtype)
        notes.append(f"[quantize int8: {quantize} ({why})]")
    compile = getattr(args, "compile", True)  # eval has no --compile: nothing to advise
    # Without --compile, `generate` and `serve` decode eagerly unless a step is saved.
    if quantize == "int8-dynamic" and compile is not True:
        # torchao's int8 x int8 runs as separate ops when eager; inductor fuses them (benchmarks/README.md).
        notes.append("[int8-dynamic decodes faster than float32 only compiled: add --compile]")
    return Picks(device, dtype, quantize, tuple(notes))


def load(args: argparse.Namespace, picks: Picks | None = None) -> tuple[GPT2, torch.device]:
    """(model, device) as --model and `picks` (default: `pick(args)`) say; the picks on stderr."""
    from gpt2kit.model import GPT2

    picks = picks or pick(args)
    model = GPT2.from_pretrained(args.model, device=picks.device, dtype=picks.dtype, quantize=picks.quantize)
    for line in picks.notes:  # once the model loaded: a bad --model is an error line alone
        print(line, file=sys.stderr)
    return model, picks.device


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
