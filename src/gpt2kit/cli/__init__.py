"""The `gpt2kit` command: one small dispatcher over the subcommand modules in this package.

Each module `gpt2kit/cli/<name>.py` defines `register(subparsers)`, which adds its parser
and sets `func` to a typed function taking the parsed arguments. Heavy imports (torch,
fastapi) happen inside those functions so `gpt2kit --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from gpt2kit.errors import Gpt2kitError

# The order commands are listed in `gpt2kit --help`; modules not listed come after.
ORDER = ["quickstart", "tokenize", "prepare", "train", "plot", "generate", "eval", "serve", "export"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the examples in epilogs as written and show defaults."""


def build_parser() -> argparse.ArgumentParser:
    from gpt2kit._version import __version__

    parser = argparse.ArgumentParser(
        prog="gpt2kit",
        description="GPT-2 exactly: tokenizer, model, training, generation, evaluation, serving.",
        epilog="example:\n  gpt2kit quickstart\n  gpt2kit generate --model gpt2 --prompt 'Hello'",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gpt2kit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    try:
        code = args.func(args)
    except Gpt2kitError as e:
        print(f"gpt2kit {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"gpt2kit {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `gpt2kit generate ... | head`
        sys.exit(0)
    sys.exit(code or 0)
