"""`gpt2kit generate`: continue a prompt with a model, streaming text to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

EXAMPLE = """examples:
  gpt2kit generate --model gpt2 --prompt "The meaning of life is" --max-new-tokens 40 --seed 1
  gpt2kit generate --model runs/shakespeare/final --prompt "ROMEO:" --top-k 40 --temperature 0.8
  gpt2kit generate --model gpt2 --prompt "Hello" --temperature 0     # greedy
  gpt2kit generate --model gpt2 --interactive --max-new-tokens 40      # a prompt loop
  gpt2kit generate --model gpt2 --prompt "Q: Why?\nA:" --stop "\n" --repetition-penalty 1.2
  gpt2kit generate --model gpt2 --prompt "The cat" --num-beams 4 --max-new-tokens 20
  gpt2kit generate --model gpt2 --prompt "Hello" --quantize int8     # 4x smaller block weights
  gpt2kit generate --model gpt2 --prompt "Once" --max-new-tokens 500 --compile  # compiled steps
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
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help=">1 discourages seen tokens")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram")
    p.add_argument(
        "--stop", action="append", default=None, help="stop before this text (repeatable; never printed)"
    )
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (no streaming)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: >0 favours long outputs")
    p.add_argument("--seed", type=int, default=None, help="make the sample reproducible")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on a GPU that supports it, else float32 (bf16 is slower on CPUs without AVX512-BF16)",
    )
    p.add_argument(
        "--quantize", default=None, choices=["int8"], help="int8 weight-only block weights (less memory)"
    )
    p.add_argument(
        "--interactive", action="store_true", help="a prompt loop (readline history); Ctrl-D quits"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step first (about a minute on CPU, needs a C++ compiler), then "
        "decode up to ~1.4x faster: for long outputs and --interactive sessions",
    )
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
    from gpt2kit.processors import build_pipeline

    build_pipeline(  # checks every sampling flag before the model loads
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    from gpt2kit.errors import ConfigError

    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.compile and args.num_beams > 1:
        raise ConfigError("--compile is for sampling and greedy search; drop it for --num-beams")
    device = pick_device(args.device)
    model = load_model(args.model, device=device, dtype=pick_dtype(args.dtype, device))
    if args.quantize == "int8":
        from gpt2kit.quantize import quantize_int8

        quantize_int8(model)
    tokenizer = load_tokenizer(args.model)
    if args.num_beams > 1 and not args.interactive:
        return _beam(args, model, tokenizer)
    if args.interactive:
        from gpt2kit.cli._repl import prompt_loop

        return prompt_loop(model, tokenizer, args)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    tokens: list[int] = []
    times: list[float] = []
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
        on_token=lambda t: (tokens.append(t), times.append(time.perf_counter())),
        stop=args.stop,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        compile=args.compile,
    ):
        out.write(piece)
        out.flush()
    dt = time.perf_counter() - t0
    out.write("\n")
    out.flush()
    rate = len(tokens) / dt if dt > 0 else 0.0
    summary = f"{len(tokens)} tokens in {dt:.2f}s: {rate:.1f} tokens/s on {device}"
    if args.compile and len(times) > 2:
        # The second token waits for the compile; the steps after it are the compiled speed.
        steps = (len(times) - 2) / (times[-1] - times[1])
        summary += f"; compiled steps {steps:.1f} tokens/s after {times[1] - t0:.1f}s of compiling"
    print(f"[{summary}]", file=sys.stderr)
    return 0


def _beam(args: argparse.Namespace, model, tokenizer) -> int:
    """Beam search: the best beam is known only at the end, so print it whole."""
    import torch

    from gpt2kit.beam import beam_search
    from gpt2kit.stopping import TextStream

    ids = tokenizer.encode(args.prompt) if args.prompt else []
    t0 = time.perf_counter()
    out = beam_search(
        model,
        torch.tensor([ids], dtype=torch.long).reshape(1, len(ids)),
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    dt = time.perf_counter() - t0
    new = out[0, max(len(ids), 1) :].tolist()
    eos = tokenizer.eot_token if tokenizer.special_tokens else model.config.eos_token_id
    if eos in new:
        new = new[: new.index(eos)]
    text = TextStream(stop=args.stop)
    for t in new:
        text.push(tokenizer.decode_bytes([t]))
    text.finish()
    sys.stdout.write(args.prompt + text.text + "\n")
    print(f"[{len(new)} tokens, {args.num_beams} beams, {dt:.2f}s]", file=sys.stderr)
    return 0
