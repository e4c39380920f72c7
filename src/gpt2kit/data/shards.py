"""Token data on disk: `DATA_DIR/meta.json` plus flat binary shards of token ids.

Layout (written by `gpt2kit prepare`, read by training and evaluation):

    DATA_DIR/meta.json          what is below, so nothing can be mixed up
    DATA_DIR/train-00000.bin    little-endian uint16 (vocab <= 65536) or uint32 ids
    DATA_DIR/val-00000.bin      ...
    DATA_DIR/tokenizer/         vocab.json + merges.txt (absent when the tokenizer is "gpt2")

`meta.json`:

    {"format": 1, "dtype": "uint16",
     "tokenizer": {"name": "gpt2" | "bpe-4096" | ..., "n_vocab": 50257, "eot_token": 50256,
                   "files": "tokenizer" | null, "sha256": tokenizer_fingerprint(...)},
     "splits": {"train": {"files": ["train-00000.bin"], "tokens": 123, "documents": 9},
                "val": {...}},
     "source": {...}}

Documents are separated by `<|endoftext|>` (each document is followed by one).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2kit import atomic
from gpt2kit.errors import DataError
from gpt2kit.tokenizer.tokenizer import Tokenizer

FORMAT = 1
SPLITS = ("train", "val")


def dtype_for(n_vocab: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50257 does), else uint32."""
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


def read_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(
            f"{data_dir}: no meta.json; create the data with `gpt2kit prepare ... --out {data_dir}`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: corrupt ({e}); re-run gpt2kit prepare") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT}; re-run gpt2kit prepare")
    return meta


def write_meta(data_dir: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    atomic.write_text(Path(data_dir) / "meta.json", json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")


def write_shard(path: str | os.PathLike[str], ids: np.ndarray) -> None:
    """Write one shard atomically (temp file, fsync, rename)."""
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(np.ascontiguousarray(ids).astype(ids.dtype.newbyteorder("<"), copy=False).tobytes())


@dataclass
class TokenData:
    """A prepared data directory: its meta, memory-mapped splits and tokenizer."""

    path: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str]) -> TokenData:
        return cls(Path(data_dir), read_meta(data_dir))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"]).newbyteorder("<")

    @property
    def n_vocab(self) -> int:
        return int(self.meta["tokenizer"]["n_vocab"])

    @property
    def eot_token(self) -> int:
        return int(self.meta["tokenizer"]["eot_token"])

    def shards(self, split: str) -> list[np.memmap]:
        """The split's shards, memory-mapped read-only (no copy, any size)."""
        info = self.meta.get("splits", {}).get(split)
        if info is None:
            raise DataError(
                f"{self.path}: no {split!r} split in meta.json (have: {list(self.meta['splits'])})"
            )
        out = []
        for name in info["files"]:
            path = self.path / name
            if not path.is_file():
                raise DataError(f"{path}: shard listed in meta.json is missing; re-run gpt2kit prepare")
            size = path.stat().st_size
            if size % self.dtype.itemsize:
                raise DataError(f"{path}: size {size} is not a multiple of {self.dtype}; the file is damaged")
            if size:
                out.append(np.memmap(path, dtype=self.dtype, mode="r"))
        return out

    def tokens(self, split: str) -> np.ndarray:
        """The whole split as one array (memory-mapped when it is a single shard)."""
        shards = self.shards(split)
        if not shards:
            return np.zeros(0, dtype=self.dtype)
        return shards[0] if len(shards) == 1 else np.concatenate(shards)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the data was made with."""
        files = self.meta["tokenizer"].get("files")
        tok = Tokenizer.gpt2() if not files else Tokenizer.from_dir(self.path / files)
        if files:
            tok.name = self.meta["tokenizer"].get("name") or tok.name  # "bpe-4096", not "tokenizer"
        if tok.n_vocab != self.n_vocab:
            raise DataError(f"{self.path}: tokenizer has {tok.n_vocab} tokens, meta.json says {self.n_vocab}")
        expected = self.meta["tokenizer"].get("sha256")
        if expected and tokenizer_fingerprint(tok) != expected:
            raise DataError(
                f"{self.path / (files or '')}: tokenizer files differ from the ones the data was made with "
                "(sha256 in meta.json); re-run gpt2kit prepare"
            )
        return tok


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the id -> bytes table: equal exactly when two tokenizers give ids the same meaning.

    >>> tokenizer_fingerprint(Tokenizer.gpt2())[:16]
    'a5623714bcf19049'
    """
    enc = tokenizer.encoding
    h = hashlib.sha256()
    for i in range(tokenizer.n_vocab):
        try:
            b = enc.decode_single_token_bytes(i)
        except KeyError:  # an unused id
            b = b""
        h.update(len(b).to_bytes(4, "little") + b)
    return h.hexdigest()


def check_tokenizer(data: TokenData, tokenizer: Tokenizer) -> None:
    """Refuse to pair token data with a tokenizer (or model vocabulary) it was not made with.

    Training and evaluation call this before reading a batch: ids from one vocabulary are
    noise to another, and nothing else would notice.

    >>> check_tokenizer(TokenData.open("data/shakespeare"), Tokenizer.gpt2())  # doctest: +SKIP
    Traceback (most recent call last):
    gpt2kit.errors.DataError: data/shakespeare was prepared with tokenizer 'bpe-4096' ...
    """
    info = data.meta["tokenizer"]
    expected = info.get("sha256")
    same = tokenizer.n_vocab == data.n_vocab and (
        tokenizer_fingerprint(tokenizer) == expected
        if expected
        else tokenizer.special_tokens.get("<|endoftext|>") == data.eot_token
    )
    if not same:
        where = f"{data.path / info['files']}" if info.get("files") else "gpt2"
        raise DataError(
            f"{data.path} was prepared with tokenizer {info.get('name')!r} ({data.n_vocab} tokens) but "
            f"{tokenizer.name!r} ({tokenizer.n_vocab} tokens) was given; use the data's tokenizer "
            f"({where}) or re-run gpt2kit prepare with --tokenizer"
        )
