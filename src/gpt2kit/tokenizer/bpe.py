"""Train a new byte-level BPE vocabulary, GPT-2 style, on your own text.

The Hugging Face `tokenizers` trainer does the counting and merging (fast, in Rust). Its
ids follow its own order (special tokens first, then the alphabet, then merges), so the
result is renumbered the way GPT-2's files are: the 256 byte tokens first in GPT-2's
`bytes_to_unicode` order, then one token per merge in merge order, then `<|endoftext|>`
last. With that numbering a token's id is its tiktoken rank, so the files load through
`gpt2kit.Tokenizer` (tiktoken, fast) and through `transformers.AutoTokenizer` alike, and
both encode text the same way.

>>> tok = train_bpe(["to be or not to be, that is the question"] * 50, vocab_size=270)
>>> tok.n_vocab, tok.eot_token
(270, 269)
>>> tok.decode(tok.encode("to be or not"))
'to be or not'
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from gpt2kit.errors import ConfigError
from gpt2kit.tokenizer.tokenizer import EOT, Tokenizer, bytes_to_unicode

log = logging.getLogger(__name__)

N_BYTES = 256
MIN_VOCAB = N_BYTES + 1  # every byte plus <|endoftext|>
MAX_VOCAB = 2**20


def train_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    name: str | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Learn up to `vocab_size - 257` merges from `texts`; return a GPT-2 style `Tokenizer`.

    Text is split with GPT-2's regex and handled as bytes, so any string round-trips.
    A pair must occur `min_frequency` times to be merged; when the text runs out of such
    pairs first, the vocabulary is smaller than asked (a warning says by how much).

    >>> tok = train_bpe(["abab abab"] * 10, vocab_size=260)
    >>> tok.decode_tokens(tok.encode("abab"))
    ['abab']
    """
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ConfigError(
            f"BPE vocabulary size {vocab_size} is out of range; use {MIN_VOCAB}..{MAX_VOCAB} "
            "(256 bytes + merges + <|endoftext|>), e.g. bpe:4096"
        )
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    # GPT-2's pre-tokenization: its regex, no prefix space, bytes mapped to printable chars.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(_nonempty(texts), trainer=trainer)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges_of(hf)]
    vocab, merges = canonical_vocab(merges)
    if len(vocab) < vocab_size:
        log.warning(
            "the text has too few repeated pairs for %d tokens: trained %d (%d merges)",
            vocab_size,
            len(vocab),
            len(merges),
        )
    return Tokenizer(vocab, merges, name=name or f"bpe-{len(vocab)}")


def canonical_vocab(merges: Iterable[tuple[str, str]]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's numbering for a merge list: 256 byte tokens, the merges in order, `<|endoftext|>`.

    A merge whose result is already a token (another pair made the same string earlier)
    is dropped: tiktoken ranks tokens, not pairs, so it could never apply.

    >>> vocab, merges = canonical_vocab([("Ġ", "t"), ("h", "e")])
    >>> vocab["!"], vocab["Ġt"], vocab["he"], vocab["<|endoftext|>"]
    (0, 256, 257, 258)
    """
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    kept: list[tuple[str, str]] = []
    for a, b in merges:
        if a + b in vocab:
            log.debug("merge %r + %r repeats token %r; dropped", a, b, a + b)
            continue
        vocab[a + b] = len(vocab)
        kept.append((a, b))
    vocab[EOT] = len(vocab)
    return vocab, kept


def _merges_of(hf: object) -> list:
    """The trained merges in order, read from the model's JSON (the stable way across versions)."""
    import json

    model = json.loads(hf.to_str())["model"]  # type: ignore[attr-defined]
    return model["merges"]


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text
