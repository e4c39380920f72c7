"""`gpt2kit tokenize`: text -> GPT-2 token ids."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2kit.errors import Gpt2kitError

EXAMPLE = """examples:
  gpt2kit tokenize --text "Hello world"
  [15496, 995]
  2 tokens
  gpt2kit tokenize notes.txt --json > ids.json
  gpt2kit tokenize --tokenizer runs/shakespeare/final --text "ROMEO:"
"""


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter

    p = sub.add_parser(
        "tokenize",
        help="print the token ids of a text",
        description="Encode text with GPT-2's byte-level BPE (or a saved tokenizer) and print the ids.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="a UTF-8 text file ('-' for standard input)")
    src.add_argument("--text", help="the text to encode")
    p.add_argument("--json", action="store_true", help="print only a JSON list of ids")
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help="'gpt2', a directory with vocab.json + merges.txt, or a GPT-2 .gguf file",
    )
    p.add_argument("--allow-special", action="store_true", help="encode <|endoftext|> as its special id")
    p.set_defaults(func=run)


def read_text(file: str) -> str:
    try:
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except FileNotFoundError:
        raise Gpt2kitError(f"{file}: no such file") from None
    except IsADirectoryError:
        raise Gpt2kitError(f"{file}: is a directory; pass a text file") from None
    except OSError as e:
        raise Gpt2kitError(f"{file}: can't read it ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Gpt2kitError(
            f"{file}: not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8"
        ) from None


def run(args: argparse.Namespace) -> int:
    from gpt2kit.tokenizer.tokenizer import Tokenizer

    text = args.text if args.text is not None else read_text(args.file)
    if args.tokenizer.lower().endswith(".gguf"):
        from gpt2kit.tokenizer import gguf_vocab  # imports the gguf package: only for .gguf files

        tok = gguf_vocab.read_tokenizer(args.tokenizer)
    else:
        tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(text, allowed_special="all" if args.allow_special else frozenset())
    if args.json:
        print(json.dumps(ids))
    else:
        print(ids)
        print(f"{len(ids)} tokens")
    return 0
