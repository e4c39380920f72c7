"""`gpt2kit prepare`: text -> token shards + meta.json, ready for `gpt2kit train`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

EXAMPLE = """examples:
  gpt2kit prepare shakespeare --out data/shakespeare --tokenizer bpe:4096
  gpt2kit prepare notes.txt more/ 'books/**/*.txt' --out data/books
  gpt2kit prepare chats.jsonl --field content --out data/chats --val-fraction 0.01
  gpt2kit prepare hf:roneneldan/TinyStories --out data/tinystories
  gpt2kit prepare hf:wikitext:wikitext-103-raw-v1:train --out data/wikitext
  gpt2kit prepare hf:saved_dataset_dir:validation --out data/mine --tokenizer runs/x/final

INPUT is a text file (one document), a folder (its .txt/.md/.rst/.text/.jsonl files),
a quoted glob, a .jsonl file (one document per line, taken from --field), 'shakespeare'
(the built-in plays), or hf:NAME[:SPLIT] / hf:NAME:CONFIG:SPLIT (a Hugging Face dataset:
hub name, save_to_disk folder, or .json/.jsonl/.parquet/.csv/.txt data files).
See docs/data.md.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter
    from gpt2kit.data.prepare import SEED, SHARD_TOKENS, VAL_FRACTION

    p = sub.add_parser(
        "prepare",
        help="tokenize text into train/val shards for training",
        description=(
            "Read documents, split them into train/val by document (seeded), tokenize them in "
            "parallel with <|endoftext|> after each, and write DATA_DIR/train-*.bin, val-*.bin "
            "and meta.json (plus DATA_DIR/tokenizer/ unless the tokenizer is gpt2)."
        ),
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="file, folder, glob, .jsonl, shakespeare, hf:NAME"
    )
    p.add_argument(
        "--out", required=True, type=Path, metavar="DATA_DIR", default=argparse.SUPPRESS, help="output folder"
    )
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help="'gpt2', a folder with vocab.json + merges.txt, or bpe:VOCAB_SIZE to train a new byte-level BPE",
    )
    p.add_argument("--field", default="text", help="the text field of .jsonl lines and hf: rows")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of documents for val")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the train/val split")
    p.add_argument("--workers", type=int, default=0, help="tokenizer threads; 0 means one per core")
    p.add_argument(
        "--shard-tokens", type=int, default=SHARD_TOKENS, help="start a new shard file after this many tokens"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.data.prepare import prepare

    start = time.perf_counter()
    meta = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        field=args.field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers or None,
        shard_tokens=args.shard_tokens,
        progress=not args.no_progress,
    )
    tok = meta["tokenizer"]
    seconds = time.perf_counter() - start
    print(f"{args.out}: tokenizer {tok['name']} ({tok['n_vocab']} tokens), {meta['dtype']}, {seconds:.1f}s")
    for split, info in meta["splits"].items():
        print(
            f"  {split}: {info['tokens']:,} tokens, {info['documents']:,} documents, {len(info['files'])} shard(s)"
        )
    if meta["replaced_bytes"]:
        print(f"  replaced {meta['replaced_bytes']:,} invalid UTF-8 byte(s) with U+FFFD")
    print(f"next: gpt2kit train --data {args.out} --out runs/NAME")
    return 0
