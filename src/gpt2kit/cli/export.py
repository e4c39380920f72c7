"""`gpt2kit export`: a model as one GGUF file for llama.cpp, plus a Modelfile for ollama."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2kit.errors import ConfigError

EXAMPLE = """examples:
  gpt2kit export --model runs/quickstart/final --format gguf --type q8_0 --out shakespeare-q8_0.gguf
  llama-cli -m shakespeare-q8_0.gguf -p "JULIET:" -n 64        # llama.cpp
  gpt2kit export --model gpt2 --format ollama --type f16 --out ollama/gpt2-f16.gguf
  ollama create gpt2 -f ollama/Modelfile && ollama run gpt2 "Hello"
  gpt2kit export --model model.gguf --format hf --out model-dir  # a GGUF back to a model directory
"""
FORMATS = ("gguf", "ollama", "hf")
TYPES = ("f32", "f16", "bf16", "q8_0")  # gpt2kit.model.gguf_file.TYPES, without importing gguf for --help


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter
    from gpt2kit.cli._common import add_model_flag

    p = sub.add_parser(
        "export",
        help="write a model as GGUF (llama.cpp, ollama, LM Studio)",
        description="Write a model directory (or a GGUF file) as one GGUF file that llama.cpp runs as its "
        "gpt2 architecture, tokenizer included: GPT-2's vocabulary or one trained by gpt2kit prepare. "
        "--format ollama adds a Modelfile beside it; --format hf writes a model directory instead.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    add_model_flag(p)
    p.add_argument("--format", default="gguf", choices=FORMATS, help="gguf, ollama (GGUF + Modelfile) or hf")
    p.add_argument(
        "--type",
        default="f16",
        choices=TYPES,
        help="GGUF weight type: q8_0 is llama.cpp's 8-bit blocks (32 weights + an fp16 scale); "
        "biases, norms and position embeddings stay f32",
    )
    p.add_argument("--out", required=True, help="the .gguf file to write (--format hf: a directory)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from gpt2kit import atomic
    from gpt2kit.model import GPT2
    from gpt2kit.model.checkpoint import load_tokenizer

    out = Path(args.out)
    if args.format != "hf" and out.suffix.lower() != ".gguf":
        raise ConfigError(f"--out {out}: name a .gguf file, e.g. --out {out.with_suffix('.gguf').name}")
    if out.is_dir() and args.format != "hf":
        raise ConfigError(f"--out {out}: is a directory; name the .gguf file to write")
    if not args.verbose:  # the gguf writer logs each file it writes at INFO level
        logging.getLogger("gguf").setLevel(logging.WARNING)
    model = GPT2.from_pretrained(args.model)  # before the tokenizer: a bad --model fails here first
    tokenizer = load_tokenizer(args.model)
    if args.format == "hf":
        model.save_pretrained(out, tokenizer=tokenizer)
        print(out)
        return 0
    model.save_gguf(out, type=args.type, tokenizer=tokenizer)
    print(out)
    if args.format == "ollama":
        eot = tokenizer.special_tokens.get("<|endoftext|>")
        stop = "<|endoftext|>" if eot is not None else None
        modelfile = out.parent / "Modelfile"
        atomic.write_text(modelfile, ollama_modelfile(out.name, stop=stop, n_ctx=model.config.n_positions))
        print(modelfile)
    print(f"[{args.type}: {out.stat().st_size / 2**20:.1f} MiB]", file=sys.stderr)
    return 0


def ollama_modelfile(gguf_name: str, *, stop: str | None, n_ctx: int) -> str:
    """An ollama Modelfile for a base model: the GGUF beside it, the raw prompt, its stop token.

    A base model has no chat template, so TEMPLATE passes the prompt through as it is; num_ctx
    keeps ollama within the model's context (its default is larger than GPT-2's 1024 positions).

    >>> print(ollama_modelfile("gpt2.gguf", stop="<|endoftext|>", n_ctx=1024))
    FROM ./gpt2.gguf
    TEMPLATE "{{ .Prompt }}"
    PARAMETER num_ctx 1024
    PARAMETER stop "<|endoftext|>"
    <BLANKLINE>
    """
    lines = [f"FROM ./{gguf_name}", 'TEMPLATE "{{ .Prompt }}"', f"PARAMETER num_ctx {n_ctx}"]
    if stop is not None:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"
