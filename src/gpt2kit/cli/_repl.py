"""`gpt2kit generate --interactive`: a prompt loop in the terminal, with readline history.

Each line is a prompt; its continuation streams out as it is generated. Ctrl-C stops the
current generation, Ctrl-D (or /quit) leaves. History persists across sessions in
$XDG_STATE_HOME/gpt2kit/history (~/.local/state/gpt2kit/history).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HELP = "Type a prompt and press Enter. Ctrl-C stops a generation; Ctrl-D or /quit leaves."


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "gpt2kit" / "history"


@contextlib.contextmanager
def readline_history(path: Path) -> Iterator[None]:
    """Arrow-key editing and history when the readline module exists (not on Windows)."""
    try:
        import readline
    except ImportError:
        yield
        return
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


def prompt_loop(model, tokenizer, args: argparse.Namespace) -> int:
    """Read prompts until EOF; stream each continuation with the sampling flags of `args`."""
    from gpt2kit.cli.generate import encode_prompt
    from gpt2kit.errors import Gpt2kitError
    from gpt2kit.generate import stream_text

    allow_special = getattr(args, "allow_special", False)

    out = sys.stdout
    print(HELP, file=sys.stderr)
    with readline_history(history_path()):
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                out.write("\n")
                return 0
            except KeyboardInterrupt:
                out.write("\n")
                continue
            if line.strip() in ("/quit", "/exit"):
                return 0
            if not line.strip():
                continue
            try:  # a bad prompt (a special token) is reported; the session goes on
                encode_prompt(tokenizer, line, allow_special=allow_special)
            except Gpt2kitError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            out.write(line)
            out.flush()
            tokens: list[int] = []
            t0 = time.perf_counter()
            try:
                for piece in stream_text(
                    model,
                    tokenizer,
                    line,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    seed=args.seed,
                    on_token=tokens.append,
                    allowed_special="all" if allow_special else frozenset(),
                    # The generate command's other sampling flags, when it has them.
                    **{
                        name: getattr(args, name)
                        for name in ("stop", "min_p", "repetition_penalty", "no_repeat_ngram_size", "compile")
                        if getattr(args, name, None) is not None
                    },
                ):
                    out.write(piece)
                    out.flush()
            except KeyboardInterrupt:
                pass  # stop this generation, keep the loop
            dt = time.perf_counter() - t0
            out.write("\n")
            out.flush()
            print(f"[{len(tokens)} tokens in {dt:.2f}s]", file=sys.stderr)
