"""Writing prompts in and continuations out for `gpt2kit generate`: shared by one-shot runs and the REPL."""

from __future__ import annotations

import argparse
import sys
import time


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


def stream_completion(model, tokenizer, prompt: str, config, args: argparse.Namespace) -> tuple[int, float]:
    """Write one sample to stdout piece by piece; returns (tokens, seconds after the first token)."""
    from gpt2kit.generation.complete import complete

    out = sys.stdout
    out.write(prompt)
    out.flush()
    tokens = 0
    first: float | None = None
    chunks = complete(
        model,
        tokenizer,
        prompt,
        config,
        stream=True,
        compile=args.compile,
        deterministic=args.deterministic,
        allowed_special="all" if args.allow_special else frozenset(),
    )
    try:
        for chunk in chunks:
            tokens += len(chunk.token_ids)
            if first is None and chunk.token_ids:
                first = time.perf_counter()
            out.write(chunk.text)
            out.flush()
    finally:
        chunks.close()  # Ctrl-C in the REPL: stop decoding, free the engine
        out.write("\n")
        out.flush()
    return tokens, (time.perf_counter() - first) if first is not None else 0.0
