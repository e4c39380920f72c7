"""`gpt2kit generate`: continue a prompt with a model, streaming text to the terminal."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from gpt2kit.cli._compiled import COMPILE_HELP
from gpt2kit.cli._stream import encode_prompt, stream_completion

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
    from gpt2kit.cli._common import add_flags, add_model_flag

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
    add_model_flag(p)
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
        "--presence-penalty",
        type=float,
        default=0.0,
        help="OpenAI's: -2..2, subtracted once from seen tokens",
    )
    p.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="OpenAI's: -2..2, subtracted per occurrence"
    )
    p.add_argument(
        "--logit-bias",
        action="append",
        default=None,
        metavar="ID=BIAS",
        help="add BIAS (-100..100) to token ID's logit (repeatable; -100 bans it)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        help=r"stop before this text (repeatable; never printed); escapes: \n is a newline, \t a tab, "
        r"\r a carriage return, \uXXXX a code point, \\ one backslash (so \\n is a literal backslash-n)",
    )
    _add_end_flags(p)
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
        action=argparse.BooleanOptionalAction,
        default=None,
        help=COMPILE_HELP,
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="each sample's tokens are the same bits as the library's alone with its seed, "
        "whatever else decodes beside it (--n samples decode together); slower (docs/generation.md)",
    )
    p.set_defaults(func=run)


def _add_end_flags(p: argparse.ArgumentParser) -> None:
    """How the text ends and what it shows: SamplingConfig's eos and text rules, vLLM's names."""
    p.add_argument(
        "--min-tokens",
        type=int,
        default=None,
        help="neither the end-of-text token nor a stop string ends the text before this many tokens",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        default=None,
        help="keep generating after <|endoftext|> (it adds no text); always --max-new-tokens tokens",
    )
    p.add_argument(
        "--include-stop-str-in-output",
        action="store_true",
        default=None,
        help="print the stop string that ended the text",
    )
    p.add_argument(
        "--skip-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--no-skip-special-tokens prints <|endoftext|> where the model writes it (default: skipped)",
    )
    p.add_argument(
        "--spaces-between-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="vLLM's option, accepted: a byte-level BPE inserts no spaces either way",
    )


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


def sampling_config(args: argparse.Namespace):
    """The sampling flags (one per SamplingConfig field, same name) as one SamplingConfig; its
    errors name the flag (ConfigError)."""
    import dataclasses

    from gpt2kit.cli._common import flag_error
    from gpt2kit.generation.config import SamplingConfig, SamplingError

    options = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SamplingConfig)
        if f.name != "logit_bias" and getattr(args, f.name, None) is not None
    }
    try:
        options["logit_bias"] = _logit_bias(getattr(args, "logit_bias", None) or [])
        return SamplingConfig(**options)
    except SamplingError as e:
        raise flag_error(e) from None


def _logit_bias(items: list[str]) -> dict[int, float]:
    """The --logit-bias values' syntax (the ranges are SamplingConfig's)."""
    from gpt2kit.errors import ConfigError

    bias = {}
    for item in items:
        token, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            bias[int(token)] = float(value)
        except ValueError:
            raise ConfigError(f"--logit-bias takes ID=BIAS, e.g. 50256=-100; got {item!r}") from None
    return bias


def check_args(args: argparse.Namespace):
    """Every flag and combination of flags, before anything loads or prints (ConfigError);
    returns the SamplingConfig."""
    from gpt2kit.errors import ConfigError
    from gpt2kit.generation.beam import check_length_penalty

    if args.stop:
        args.stop = [unescape(s) for s in args.stop]
    config = sampling_config(args)
    if args.num_beams < 1:
        raise ConfigError(f"--num-beams must be >= 1 (1 = no beam search), got {args.num_beams}")
    check_length_penalty(args.length_penalty)
    _check_combinations(args)
    return config


def _check_combinations(args: argparse.Namespace) -> None:
    from gpt2kit.errors import ConfigError

    beams = args.num_beams > 1
    rich = "--n" if args.n > 1 else "--logprobs" if args.logprobs is not None else None
    if beams and (args.min_tokens or args.ignore_eos):
        flag = "--min-tokens" if args.min_tokens else "--ignore-eos"
        raise ConfigError(f"{flag} works with sampling and greedy search, not --num-beams; drop one")
    if beams and rich:
        raise ConfigError(f"{rich} works with sampling and greedy search, not --num-beams; drop one")
    if args.interactive and (beams or rich):
        flag = rich or "--num-beams"
        raise ConfigError(f"--interactive streams one sample per prompt; drop {flag} or --interactive")


def run(args: argparse.Namespace) -> int:
    from gpt2kit.cli._common import load, pick
    from gpt2kit.model.checkpoint import load_tokenizer

    config = check_args(args)
    picks = pick(args)  # a bad --device fails before the tokenizer loads
    tokenizer = load_tokenizer(args.model)
    encode_prompt(tokenizer, args.prompt, allow_special=args.allow_special)  # fails before any output
    model, device = load(args, picks)
    if args.compile:
        from gpt2kit.cli._compiled import prepare

        prepare(model, rows=max(config.n, args.num_beams), compile=True, deterministic=args.deterministic)
    if args.interactive:
        from gpt2kit.cli._repl import prompt_loop

        return prompt_loop(model, tokenizer, config, args)
    if args.num_beams > 1:
        return _beam(args, config, model, tokenizer)
    if args.n > 1 or args.logprobs is not None:
        return _samples(args, config, model, tokenizer, device)
    return _stream(args, config, model, tokenizer, device)


def _stream(args: argparse.Namespace, config, model, tokenizer, device: str) -> int:
    """One sample, written to stdout piece by piece as it is decoded."""
    t0 = time.perf_counter()
    tokens, after_first = stream_completion(model, tokenizer, args.prompt, config, args)
    dt = time.perf_counter() - t0
    rate = tokens / dt if dt > 0 else 0.0
    summary = f"{tokens} tokens in {dt:.2f}s: {rate:.1f} tokens/s on {device}"
    if tokens > 2 and after_first > 0:
        # The first token waits for the prompt (and a compile or load); the rest is the step speed.
        summary += f"; {(tokens - 1) / after_first:.1f} tokens/s after the first"
    print(f"[{summary}]", file=sys.stderr)
    return 0


def _samples(args: argparse.Namespace, config, model, tokenizer, device: str) -> int:
    """--n samples (decoded together as one batch) and/or --logprobs tables, printed at the end.

    Sample j uses seed + j, as `complete` does, so sample 1 equals the streamed sample.
    """
    from gpt2kit.generation.complete import complete

    t0 = time.perf_counter()
    done = complete(
        model,
        tokenizer,
        args.prompt,
        config,
        compile=args.compile,
        deterministic=args.deterministic,
        allowed_special="all" if args.allow_special else frozenset(),
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


def _beam(args: argparse.Namespace, config, model, tokenizer) -> int:
    """Beam search: the best beam is known only at the end, so print it whole."""
    from gpt2kit.generation.generate import generate
    from gpt2kit.generation.prompts import eos_id, fit_prompt
    from gpt2kit.generation.textstream import decode

    ids = encode_prompt(tokenizer, args.prompt, allow_special=args.allow_special)
    prompt = fit_prompt(model, ids, config.max_new_tokens, tokenizer=tokenizer)  # where the new tokens start
    eos = eos_id(model, tokenizer)
    t0 = time.perf_counter()
    out = generate(
        model,
        [prompt],
        config.replace(stop=()),  # stop strings cut the text below
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        eos_token_id=eos,
        compile=args.compile,
        deterministic=args.deterministic,
    )
    dt = time.perf_counter() - t0
    new = out[0][len(prompt) :]
    if eos in new:
        new = new[: new.index(eos)]
    sys.stdout.write(args.prompt + decode(tokenizer, new, config) + "\n")
    print(f"[{len(new)} tokens, {args.num_beams} beams, {dt:.2f}s]", file=sys.stderr)
    return 0
