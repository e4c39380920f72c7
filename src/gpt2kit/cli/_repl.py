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


def prompt_loop(model, tokenizer, config, args: argparse.Namespace) -> int:
    """Read prompts until EOF; stream each continuation with `config` (a SamplingConfig)."""
    from gpt2kit.cli._stream import encode_prompt, stream_completion
    from gpt2kit.errors import Gpt2kitError

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
                encode_prompt(tokenizer, line, allow_special=args.allow_special)
            except Gpt2kitError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            tokens = 0
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops this generation, not the loop
                tokens, _ = stream_completion(model, tokenizer, line, config, args)
            print(f"[{tokens} tokens in {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
