"""Reading a GGUF file's header fast: its key/values and where each tensor lies.

The `gguf` package's `GGUFReader` builds a numpy array per string, so a GPT-2 file's 50257
tokens and 50000 merges take it 10-35 seconds; this parser reads the same header in well
under a second (tests/model/test_gguf.py checks that both agree). It lives in the tokenizer
package, the lowest one that reads GGUF files; `gpt2kit.model.gguf_file` reads the tensors
with it.

The format (llama.cpp's gguf.h, versions 2 and 3, little-endian): "GGUF", version u32,
tensor count u64, key/value count u64; each key a string (u64 length + UTF-8) with a u32
value type; then per tensor its name, u32 dimension count, u64 dimensions (innermost first),
u32 ggml type and u64 offset; the data starts at the next multiple of `general.alignment`.

>>> header = read_header("gpt2-f16.gguf")  # doctest: +SKIP
>>> header.metadata["general.architecture"], header.tensors[0].name  # doctest: +SKIP
('gpt2', 'token_embd.weight')
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2kit.errors import CheckpointError

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF's order: innermost dimension first
    type: int  # a ggml type (gguf.GGMLQuantizationType's value)
    offset: int  # from the start of the file


@dataclass(frozen=True)
class Header:
    metadata: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.data):
            raise ValueError("a string runs past the end of the file")
        text = self.data[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return text

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind in SCALARS:
            return self.take(SCALARS[kind])
        if kind != ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, n = self.take("<I"), self.take("<Q")
        if item in SCALARS:  # numbers: one numpy read instead of n struct calls
            dtype = np.dtype(SCALARS[item])
            values = np.frombuffer(self.data, dtype=dtype, count=n, offset=self.pos)
            self.pos += n * dtype.itemsize
            return values.tolist()
        return [self.value(item) for _ in range(n)]


def read_header(path: str | os.PathLike[str]) -> Header:
    """The key/values and tensor table of a GGUF file; a missing or malformed one is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file; check the path")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(data)
    except (ValueError, struct.error, UnicodeDecodeError, OSError, MemoryError) as e:
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:160]}); re-export or re-download it"
        ) from None


def _parse(data: mmap.mmap) -> Header:
    if data[:4] != MAGIC:
        raise ValueError(f"it starts with {bytes(data[:4])!r}, not {MAGIC!r}")
    cur = _Cursor(data)
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; versions 2 and 3 are supported")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        shape = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
        infos.append((name, shape, cur.take("<I"), cur.take("<Q")))
    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-cur.pos // align) * align
    return Header(metadata, [TensorInfo(n, s, t, start + o) for n, s, t, o in infos])
