"""A byte-level BPE vocabulary as GGUF's `tokenizer.ggml.*` keys, both ways.

llama.cpp keeps the tokenizer inside the model file: the token strings by id (in GPT-2's
`bytes_to_unicode` spelling, as in `vocab.json`), one type per token, the merges as
"left right" strings in rank order, and the name of the pre-tokenizer regex. For GPT-2's
regex that name is "gpt-2"; llama.cpp's own converter picks it by hashing the tokenizer's
output on a test text, so it refuses every newly trained vocabulary, while here the name is
written directly: every vocabulary gpt2kit makes splits text with GPT-2's regex.

>>> from gpt2kit.tokenizer import Tokenizer
>>> fields = to_fields(Tokenizer.gpt2())
>>> fields.tokens[15496], fields.types[50256] == CONTROL, fields.merges[0]
('Hello', True, 'Ġ t')
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2kit.errors import TokenizerError
from gpt2kit.tokenizer.gguf_reader import read_header
from gpt2kit.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MODEL = "gpt2"  # tokenizer.ggml.model: byte-level BPE with merges
PRE = "gpt-2"  # tokenizer.ggml.pre: the name llama.cpp gives GPT-2's split regex
# gguf.TokenType's values (llama.cpp's llama_token_type), spelled out so that reading a
# vocabulary needn't import the gguf package (tests/model/test_gguf.py checks they agree).
NORMAL, CONTROL, UNUSED = 1, 3, 5

KEYS = {
    "model": "tokenizer.ggml.model",
    "pre": "tokenizer.ggml.pre",
    "tokens": "tokenizer.ggml.tokens",
    "types": "tokenizer.ggml.token_type",
    "merges": "tokenizer.ggml.merges",
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
}


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer keys of a GGUF file: every list indexed by token id (merges by rank)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]


def read_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer inside a GPT-2 GGUF file (its tokens and merges).

    >>> read_tokenizer("gpt2-f16.gguf").encode("Hello world")  # doctest: +SKIP
    [15496, 995]
    """
    return tokenizer_from_metadata(read_header(path).metadata, source=str(path))


def tokenizer_from_metadata(meta: Mapping[str, Any], *, source: str) -> Tokenizer:
    """The Tokenizer that a GGUF file's metadata (`metadata(reader)`) describes."""
    vocab, merges = from_fields(meta, source=source)
    try:
        return Tokenizer(vocab, merges, name=Path(source).stem)
    except TokenizerError as e:
        raise TokenizerError(f"{source}: {e}") from None


def to_fields(tokenizer: Tokenizer) -> GGUFVocab:
    """A `Tokenizer`'s vocabulary as GGUF lists; special tokens are CONTROL tokens.

    An id no token has (a gap) becomes an UNUSED "[PAD<id>]", as llama.cpp's converter writes it.
    """
    by_id = {i: t for t, i in tokenizer.vocab.items()}
    special = set(tokenizer.special_tokens.values())
    tokens, types = [], []
    for i in range(tokenizer.n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(CONTROL if i in special else NORMAL)
    return GGUFVocab(tokens, types, [f"{a} {b}" for a, b in tokenizer.merges])


def from_fields(fields: Mapping[str, Any], *, source: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) for `Tokenizer(vocab, merges)` from a GGUF file's tokenizer keys.

    `fields` maps key names to values (strings, lists). Unused ids are left out of the vocab.
    """
    arch = fields.get("general.architecture", MODEL)
    if arch != MODEL:  # the same words as gpt2kit.model.gguf_file's check: either may come first
        raise TokenizerError(
            f"{source}: a GGUF file of architecture {arch!r}; gpt2kit reads only GPT-2 ({MODEL!r}) models"
        )
    model = fields.get(KEYS["model"])
    if model is None:
        raise TokenizerError(f"{source}: the GGUF file has no tokenizer ({KEYS['model']} is missing)")
    if model != MODEL:
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model is {model!r}, not GPT-2's byte-level BPE ({MODEL!r}); "
            "gpt2kit reads only GPT-2 style vocabularies"
        )
    pre = fields.get(KEYS["pre"], "default")
    if pre != PRE:
        log.warning(
            "%s: pre-tokenizer %r is not %r; text is split with GPT-2's regex anyway", source, pre, PRE
        )
    tokens: Sequence[str] = fields.get(KEYS["tokens"]) or []
    types: Sequence[int] = fields.get(KEYS["types"]) or [NORMAL] * len(tokens)
    raw_merges: Sequence[str] = fields.get(KEYS["merges"]) or []
    if len(types) != len(tokens):
        raise TokenizerError(
            f"{source}: {len(tokens)} tokens but {len(types)} token types; the file is damaged"
        )
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind != UNUSED}
    merges = []
    for rank, merge in enumerate(raw_merges):
        # llama.cpp splits at the first space after the first character (llama-vocab.cpp).
        cut = merge.find(" ", 1)
        if cut < 0:
            raise TokenizerError(
                f"{source}: merge {rank} ({merge!r}) is not 'left right'; the file is damaged"
            )
        merges.append((merge[:cut], merge[cut + 1 :]))
    return vocab, merges
