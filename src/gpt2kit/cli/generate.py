"""`gpt2kit generate`: continue a prompt with a model, streaming text to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

EXAMPLE = """examples:
  gpt2kit generate --model gpt2 --prompt "The meaning of life is" --max-new-tokens 40 --seed 1
  gpt2kit generate --model runs/shakespeare/final --prompt "ROMEO:" --top-k 40 --temperature 0.8
  gpt2kit generate --model gpt2 --prompt "Hello" --temperature 0     # greedy
"""


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter

    p = sub.add_parser(
        "generate",
        help="continue a prompt with a model",
        description=(
            "Continue a prompt. The text streams to stdout as it is produced; tokens/s goes to "
            "stderr. An empty prompt starts from <|endoftext|> (an unconditional sample)."
        ),
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory or Hugging Face hub id (e.g. gpt2)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; <1 peaked, >1 flat")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set reaching p")
    p.add_argument("--seed", type=int, default=None, help="make the sample reproducible")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def pick_device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.checkpoint import load_model, load_tokenizer
    from gpt2kit.generate import stream_text
    from gpt2kit.sampling import check_sampling

    check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens < 0:
        from gpt2kit.errors import ConfigError

        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    device = pick_device(args.device)
    model = load_model(args.model, device=device, dtype=pick_dtype(args.dtype, device))
    tokenizer = load_tokenizer(args.model)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    tokens: list[int] = []
    t0 = time.perf_counter()
    for piece in stream_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        on_token=tokens.append,
    ):
        out.write(piece)
        out.flush()
    dt = time.perf_counter() - t0
    out.write("\n")
    out.flush()
    rate = len(tokens) / dt if dt > 0 else 0.0
    print(f"[{len(tokens)} tokens in {dt:.2f}s: {rate:.1f} tokens/s on {device}]", file=sys.stderr)
    return 0
