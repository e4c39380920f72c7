"""`gpt2kit generate`: continue a prompt with a model, streaming text to the terminal."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

EXAMPLE = r"""examples:
  gpt2kit generate --model gpt2 --prompt "The meaning of life is" --max-new-tokens 40 --seed 1
  gpt2kit generate --model runs/shakespeare/final --prompt "ROMEO:" --top-k 40 --temperature 0.8
  gpt2kit generate --model gpt2 --prompt "Hello" --temperature 0     # greedy
  gpt2kit generate --model gpt2 --interactive --max-new-tokens 40      # a prompt loop
  gpt2kit generate --model gpt2 --prompt $'Q: Why?\nA:' --stop '\n' --repetition-penalty 1.2
  gpt2kit generate --model gpt2 --prompt "The cat" --num-beams 4 --max-new-tokens 20
  gpt2kit generate --model gpt2 --prompt "Once" --n 3 --seed 0 --max-new-tokens 20  # 3 samples
  gpt2kit generate --model gpt2 --prompt "Hello" --max-new-tokens 5 --logprobs 3  # + a log-prob table
  gpt2kit generate --model gpt2 --prompt "<|endoftext|>Hello" --allow-special
  gpt2kit generate --model gpt2 --prompt "Hello" --dtype bfloat16 --quantize int8  # int8 weights
  gpt2kit generate --model gpt2 --prompt "Once" --max-new-tokens 500 --compile  # compiled steps
"""


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter
    from gpt2kit.cli._model import add_flags

    p = sub.add_parser(
        "generate",
        help="continue a prompt with a model",
        description=(
            "Continue a prompt. The text streams to stdout as it is produced; tokens/s goes to "
            "stderr. An empty prompt starts from <|endoftext|> (an unconditional sample). "
            "--n, --logprobs and --num-beams print their results whole at the end."
        ),
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory or Hugging Face hub id (e.g. gpt2)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument(
        "--allow-special",
        action="store_true",
        help="encode special tokens written in the prompt (<|endoftext|>) as those tokens",
    )
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; <1 peaked, >1 flat")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set reaching p")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help=">1 discourages seen tokens")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        help=r"stop before this text (repeatable; never printed); escapes: \n is a newline, \t a tab, "
        r"\r a carriage return, \uXXXX a code point, \\ one backslash (so \\n is a literal backslash-n)",
    )
    p.add_argument("--n", type=int, default=1, help="this many samples of the prompt, each under a header")
    p.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="K",
        help="after the text, a table of each generated token's log-probability and the K most likely ones",
    )
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (no streaming)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: >0 favours long outputs")
    p.add_argument("--seed", type=int, default=None, help="make the sample reproducible")
    add_flags(p)
    p.add_argument(
        "--interactive", action="store_true", help="a prompt loop (readline history); Ctrl-D quits"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step first (about a minute on CPU, needs a C++ compiler), then decode "
        "about 1.4x faster than without it (gpt2 at batch 1 on a 2-core CPU; about 2x transformers): "
        "for long outputs and --interactive sessions",
    )
    p.set_defaults(func=run)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)


def unescape(text: str) -> str:
    r"""Read the backslash escapes \n \t \r \\ \uXXXX in a --stop value; other backslashes stay.

    Not `codecs.decode(text, "unicode_escape")`: that reads the text as Latin-1, mangling
    any non-ASCII character in it.

    >>> unescape(r"\n\\n é\u00e9\q")
    '\n\\n éé\\q'
    """

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        return chr(int(e[1:], 16)) if len(e) == 5 else _ESCAPES.get(e, m.group(0))

    return _ESCAPE.sub(one, text)


def check_args(args: argparse.Namespace) -> None:
    """Every flag and combination of flags, before anything loads or prints (ConfigError)."""
    from gpt2kit.beam import check_length_penalty
    from gpt2kit.errors import ConfigError
    from gpt2kit.processors import build_pipeline

    build_pipeline(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise ConfigError(f"--num-beams must be >= 1 (1 = no beam search), got {args.num_beams}")
    check_length_penalty(args.length_penalty)
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.logprobs is not None and not 0 <= args.logprobs <= 20:
        raise ConfigError(f"--logprobs must be in [0, 20], got {args.logprobs}")
    if any(s == "" for s in args.stop or ()):
        raise ConfigError("--stop '' would stop before the first token; give the text to stop before")
    _check_combinations(args)


def _check_combinations(args: argparse.Namespace) -> None:
    from gpt2kit.errors import ConfigError

    beams = args.num_beams > 1
    rich = "--n" if args.n > 1 else "--logprobs" if args.logprobs is not None else None
    if beams and args.compile:
        raise ConfigError("--compile is for sampling and greedy search; drop it for --num-beams")
    if beams and rich:
        raise ConfigError(f"{rich} works with sampling and greedy search, not --num-beams; drop one")
    if args.interactive and (beams or rich):
        flag = rich or "--num-beams"
        raise ConfigError(f"--interactive streams one sample per prompt; drop {flag} or --interactive")
    if args.compile and rich:
        raise ConfigError(f"--compile is for single streamed samples; drop it for {rich}")


def encode_prompt(tokenizer, prompt: str, *, allow_special: bool) -> list[int]:
    """The prompt's ids; a special token written in it is an error naming --allow-special."""
    from gpt2kit.errors import ConfigError

    if not prompt:
        return []
    if allow_special:
        return tokenizer.encode(prompt, allowed_special="all")
    found = next((s for s in tokenizer.special_tokens if s in prompt), None)
    if found is not None:
        raise ConfigError(
            f"the prompt contains the special token {found}; add --allow-special to encode it as "
            "that token, or remove it from the prompt"
        )
    return tokenizer.encode(prompt)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.checkpoint import load_tokenizer
    from gpt2kit.cli._model import load
    from gpt2kit.device import pick_device

    check_args(args)
    args.stop = [unescape(s) for s in args.stop] if args.stop else None
    pick_device(args.device)  # a bad --device fails before the tokenizer loads
    tokenizer = load_tokenizer(args.model)
    encode_prompt(tokenizer, args.prompt, allow_special=args.allow_special)  # fails before any output
    model, device = load(args)
    if args.interactive:
        from gpt2kit.cli._repl import prompt_loop

        return prompt_loop(model, tokenizer, args)
    if args.num_beams > 1:
        return _beam(args, model, tokenizer)
    if args.n > 1 or args.logprobs is not None:
        return _samples(args, model, tokenizer, device)
    return _stream(args, model, tokenizer, device)


def sampling_options(args: argparse.Namespace) -> dict:
    """The flags `stream_text` and `complete` both take, as their keyword arguments."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "stop": args.stop,
        "seed": args.seed,
        "allowed_special": "all" if args.allow_special else frozenset(),
    }


def _stream(args: argparse.Namespace, model, tokenizer, device: str) -> int:
    """One sample, written to stdout piece by piece as it is decoded."""
    from gpt2kit.generate import stream_text

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
        on_token=lambda t: (tokens.append(t), times.append(time.perf_counter())),
        compile=args.compile,
        **sampling_options(args),
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


def _samples(args: argparse.Namespace, model, tokenizer, device: str) -> int:
    """--n samples (decoded together as one batch) and/or --logprobs tables, printed at the end.

    Sample j uses seed + j, as `complete` does, so sample 1 equals the streamed sample.
    """
    from gpt2kit.completion import complete

    t0 = time.perf_counter()
    done = complete(
        model,
        tokenizer,
        args.prompt,
        n=args.n,
        logprobs=args.logprobs,
        **sampling_options(args),
    )
    dt = time.perf_counter() - t0
    out = sys.stdout
    for j, c in enumerate(done):
        if args.n > 1:
            out.write(f"--- sample {j + 1}/{args.n} ---\n")
        out.write(args.prompt + c.text + "\n")
        if args.logprobs is not None:
            out.write(logprob_table(tokenizer, c))
    n_tokens = sum(len(c.token_ids) for c in done)
    rate = n_tokens / dt if dt > 0 else 0.0
    print(f"[{n_tokens} tokens in {dt:.2f}s: {rate:.1f} tokens/s on {device}]", file=sys.stderr)
    return 0


def logprob_table(tokenizer, completion) -> str:
    """One line per generated token: the token (JSON-quoted), its log-probability, then the
    K most likely tokens with theirs (all under the model's own distribution)."""
    tops = completion.top_logprobs or [{} for _ in completion.token_ids]
    k = len(tops[0]) if tops else 0

    def show(token_id: int) -> str:
        return json.dumps(tokenizer.decode_tokens([token_id])[0], ensure_ascii=False)

    rows = [
        (show(t), f"{lp:.4f}", ", ".join(f"{show(a)} {alp:.4f}" for a, alp in top.items()))
        for t, lp, top in zip(completion.token_ids, completion.token_logprobs, tops, strict=True)
    ]
    width = max([len("token"), *(len(r[0]) for r in rows)])
    lines = [f"{'token':<{width}}  {'logprob':>8}  {f'top {k}' if k else ''}".rstrip()]
    lines += [f"{tok:<{width}}  {lp:>8}  {alts}".rstrip() for tok, lp, alts in rows]
    return "\n".join(lines) + "\n"


def _beam(args: argparse.Namespace, model, tokenizer) -> int:
    """Beam search: the best beam is known only at the end, so print it whole."""
    import torch

    from gpt2kit.generate import eos_id, generate, prepare_prompt
    from gpt2kit.stopping import TextStream

    ids = encode_prompt(tokenizer, args.prompt, allow_special=args.allow_special)
    # Prepared here (empty -> <|endoftext|>, too long -> cut) so we know where the new tokens start.
    prompt, _, _ = prepare_prompt(
        model, torch.tensor([ids], dtype=torch.long).reshape(1, len(ids)), None, args.max_new_tokens
    )
    eos = eos_id(model, tokenizer)
    t0 = time.perf_counter()
    out = generate(
        model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        eos_token_id=eos,
    )
    dt = time.perf_counter() - t0
    new = out[0, prompt.shape[1] :].tolist()
    if eos in new:
        new = new[: new.index(eos)]
    text = TextStream(stop=args.stop)
    for t in new:
        text.push(tokenizer.decode_bytes([t]))
    text.finish()
    sys.stdout.write(args.prompt + text.text + "\n")
    print(f"[{len(new)} tokens, {args.num_beams} beams, {dt:.2f}s]", file=sys.stderr)
    return 0
