"""Text -> token shards: the pipeline behind `gpt2kit prepare`.

1. Read documents from the INPUTs (`gpt2kit.data.corpora`).
2. Split them into train/val by document, reproducibly (see `assign_splits`).
3. Choose the tokenizer: GPT-2's, a saved one, or train a byte-level BPE on the train split.
4. Tokenize in parallel threads (tiktoken releases the GIL), `<|endoftext|>` after each document.
5. Write `train-00000.bin`, ... and `val-00000.bin`, ... atomically, `meta.json` last
   (the layout is `gpt2kit.data.shards`'s), so a crash never leaves a directory that looks complete;
   a rerun deletes what a crashed run left half written.

>>> meta = prepare(["shakespeare"], Path("data/shakespeare"), tokenizer="bpe:4096")  # doctest: +SKIP
>>> meta["splits"]["train"]["tokens"]  # doctest: +SKIP
1435421
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gpt2kit.data import shards as token_data
from gpt2kit.data.corpora import Corpus, open_corpus
from gpt2kit.errors import ConfigError, DataError
from gpt2kit.faults import pause_point
from gpt2kit.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

VAL_FRACTION = 0.005
SEED = 1337
SHARD_TOKENS = 100_000_000
# A lone document is cut into about this many chunks, so there is something to validate on.
SINGLE_DOCUMENT_CHUNKS = 1000
MIN_CHUNK_CHARS = 64
# Texts handed to tiktoken per call: large enough to keep every thread busy.
BATCH_CHARS = 8_000_000
BATCH_DOCUMENTS = 4096
SPLITS = ("train", "val")


def prepare(
    inputs: list[str],
    out: Path,
    *,
    tokenizer: str = "gpt2",
    field: str = "text",
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
    workers: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `inputs` into the data directory `out`; return the meta.json written.

    `tokenizer` is "gpt2", a directory with vocab.json + merges.txt, or "bpe:VOCAB_SIZE"
    to train a new byte-level BPE on the training documents. `progress` shows a tqdm bar
    (bytes read, MB/s, ETA) on stderr.

    >>> meta = prepare(["notes.txt"], Path("data/notes"), val_fraction=0.1)  # doctest: +SKIP
    >>> meta["tokenizer"]["name"], meta["dtype"]  # doctest: +SKIP
    ('gpt2', 'uint16')
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    out = Path(out)
    workers = _check_options(
        inputs, out, val_fraction=val_fraction, shard_tokens=shard_tokens, workers=workers
    )
    kind, arg = parse_tokenizer_spec(tokenizer)
    corpora = [open_corpus(spec, field=field) for spec in inputs]  # fails fast on missing inputs
    start = time.perf_counter()

    def splits() -> Iterator[tuple[str, str]]:
        return assign_splits(_documents(corpora), val_fraction=val_fraction, seed=seed)

    # Look at the first document before touching `out`: empty input must not cost the old data.
    pairs = _not_empty(splits(), inputs)
    if kind == "bpe":
        tok = _train_tokenizer(pairs, corpora, vocab_size=int(arg), progress=progress)
        log.info("trained %s in %.1fs", tok, time.perf_counter() - start)
        pairs = splits()  # a second pass over the input for tokenizing
    else:
        tok = Tokenizer.gpt2() if kind == "gpt2" else Tokenizer.from_dir(arg)

    eot = tok.eot_token  # a tokenizer without <|endoftext|> fails here, before `out` changes
    dtype = token_data.dtype_for(tok.n_vocab)
    out.mkdir(parents=True, exist_ok=True)
    old_meta = _forget_previous(out)
    _remove_crash_leftovers(out)
    writers = {split: ShardWriter(out, split, dtype=dtype, shard_tokens=shard_tokens) for split in SPLITS}
    n_docs = _write_shards(pairs, corpora, tok, writers, eot=eot, workers=workers, progress=progress)
    meta: dict[str, Any] = {
        "dtype": dtype.name,
        "tokenizer": _tokenizer_meta(out, tok, kind, arg, old_meta),
        "splits": {split: w.info() for split, w in writers.items()},
        "source": {
            "inputs": [c.describe() for c in corpora],
            "field": field,
            "documents": n_docs,
            "bytes": sum(c.bytes_read for c in corpora),
        },
        "seed": seed,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "replaced_bytes": sum(c.replaced_bytes for c in corpora),
    }
    _remove_stale_shards(out, keep={f for w in writers.values() for f in w.files})
    token_data.write_meta(out, meta)
    _log_summary(out, meta, seconds=time.perf_counter() - start)
    return token_data.read_meta(out)


def _check_options(
    inputs: list[str], out: Path, *, val_fraction: float, shard_tokens: int, workers: int | None
) -> int:
    """Refuse bad arguments before any work; returns the number of tokenizer threads."""
    if not inputs:
        raise DataError("no INPUT given; pass text files, folders, globs, 'shakespeare' or hf:NAME")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be >= 1, got {shard_tokens}")
    workers = workers or _cpu_count()
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (or 0 for one per core), got {workers}")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pass a new or existing folder to --out")
    return workers


def _not_empty(pairs: Iterator[tuple[str, str]], inputs: list[str]) -> Iterator[tuple[str, str]]:
    """`pairs` unchanged, once its first document is read: no document at all is an error."""
    first = next(pairs, None)
    if first is None:
        raise DataError(f"{', '.join(inputs)}: no text found (the input is empty); check the INPUT paths")
    return itertools.chain([first], pairs)


def _train_tokenizer(
    pairs: Iterable[tuple[str, str]], corpora: list[Corpus], *, vocab_size: int, progress: bool
) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens trained on the train split's documents."""
    from gpt2kit.tokenizer.bpe import train_bpe

    with _progress_bar(corpora, "reading for BPE", progress) as bar:
        train_texts = (text for split, text in _tracked(pairs, corpora, bar) if split == "train")
        # The trainer's own bar is for terminals only: piped, it prints blank lines to stdout.
        return train_bpe(train_texts, vocab_size=vocab_size, show_progress=progress and sys.stdout.isatty())


def _write_shards(
    pairs: Iterable[tuple[str, str]],
    corpora: list[Corpus],
    tok: Tokenizer,
    writers: dict[str, ShardWriter],
    *,
    eot: int,
    workers: int,
    progress: bool,
) -> int:
    """Tokenize the documents in batches into each split's shards, `eot` after each; returns
    how many documents.

    On any error (Ctrl-C too) the shard being written is dropped, so none is left half written.
    """
    n_docs = 0
    try:
        with _progress_bar(corpora, "tokenizing", progress) as bar:
            for batch in _batches(_tracked(pairs, corpora, bar)):
                texts = [text for _, text in batch]
                ids = tok.encoding.encode_ordinary_batch(texts, num_threads=workers)
                n_docs += len(batch)
                for split, w in writers.items():
                    docs = [d for (s, _), d in zip(batch, ids, strict=True) if s == split]
                    if docs:
                        w.write(_join(docs, eot=eot, dtype=w.dtype), documents=len(docs))
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return n_docs


def _tokenizer_meta(
    out: Path, tok: Tokenizer, kind: str, arg: str, old_meta: dict[str, Any]
) -> dict[str, Any]:
    """meta.json's "tokenizer", saving a trained or loaded tokenizer's files to out/tokenizer
    (GPT-2's needs none: a folder an earlier prepare saved there is removed)."""
    files = None
    if kind != "gpt2":
        files = "tokenizer"
        tok.save(out / files)
    elif (out / "tokenizer").is_dir() and (old_meta.get("tokenizer") or {}).get("files") == "tokenizer":
        shutil.rmtree(out / "tokenizer")  # left by an earlier prepare with another tokenizer
    return {
        "name": tok.name if kind != "dir" else Path(arg).resolve().name,
        "n_vocab": tok.n_vocab,
        "eot_token": tok.eot_token,
        "files": files,
        "sha256": token_data.tokenizer_fingerprint(tok),
    }


def _log_summary(out: Path, meta: dict[str, Any], *, seconds: float) -> None:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    log.debug(
        "%s: %d train tokens (%d documents), %d val tokens (%d documents) in %.1fs",
        out,
        train["tokens"],
        train["documents"],
        val["tokens"],
        val["documents"],
        seconds,
    )
    if meta["val_fraction"] > 0 and not val["documents"]:
        log.warning("the val split is empty: the input is a single short document; add more text")


def parse_tokenizer_spec(spec: str) -> tuple[str, str]:
    """`gpt2` | `bpe:VOCAB_SIZE` | a directory -> ("gpt2" | "bpe" | "dir", argument).

    >>> parse_tokenizer_spec("bpe:4096")
    ('bpe', '4096')
    """
    if spec == "gpt2":
        return "gpt2", ""
    if spec.startswith("bpe:"):
        size = spec.removeprefix("bpe:")
        if not size.isdigit():
            raise ConfigError(
                f"--tokenizer {spec}: expected bpe:VOCAB_SIZE with a whole number, e.g. bpe:4096"
            )
        return "bpe", size
    if Path(spec).is_dir():
        return "dir", spec
    raise ConfigError(
        f"--tokenizer {spec}: not 'gpt2', 'bpe:VOCAB_SIZE' or a folder with vocab.json + merges.txt"
    )


def assign_splits(docs: Iterable[str], *, val_fraction: float, seed: int) -> Iterator[tuple[str, str]]:
    """Yield ("train" | "val", document) for each document: the split, by document, seeded.

    Each document goes to val with probability `val_fraction` (one seeded draw per
    document, in input order), so the split depends only on the documents and the seed,
    never on batching or threads, and works on streams of unknown length. When that leaves
    val empty and there are >= 2 documents, one training document (chosen uniformly by
    reservoir sampling, also seeded) moves to val: only that one is held in memory.

    A lone document (say, one big text file) is first cut into about 1000 chunks at
    paragraph breaks (`chunk_document`), each then a document of its own.

    >>> [s for s, _ in assign_splits(["a", "b", "c"], val_fraction=0.01, seed=1)]
    ['train', 'train', 'val']
    """
    rng = random.Random(seed)
    held: str | None = None
    n = n_train = n_val = 0
    for text in _expand_lone_document(docs):
        n += 1
        if rng.random() < val_fraction:
            n_val += 1
            yield "val", text
            continue
        n_train += 1
        if val_fraction > 0 and n_val == 0 and (held is None or rng.random() * n_train < 1):
            if held is not None:
                yield "train", held
            held = text
            continue
        yield "train", text
    if held is not None:
        yield ("val" if n_val == 0 and n >= 2 else "train"), held


def chunk_document(
    text: str, *, chunks: int = SINGLE_DOCUMENT_CHUNKS, min_chars: int = MIN_CHUNK_CHARS
) -> list[str]:
    """Cut `text` into about `chunks` pieces at paragraph breaks (else line breaks, else spaces).

    Pieces are at least `min_chars` long (bar the last) and concatenate back to `text` exactly.

    >>> chunk_document("one\\n\\ntwo\\n\\nthree", chunks=3, min_chars=1)
    ['one\\n\\n', 'two\\n\\n', 'three']
    """
    target = max(len(text) // chunks, min_chars, 1)
    pieces = []
    start = 0
    while len(text) - start > target:
        cut = start + 4 * target  # no break anywhere near: cut mid-text (e.g. CJK without spaces)
        for sep in ("\n\n", "\n", " "):
            j = text.find(sep, start + max(target - len(sep), 0), start + 4 * target)
            if j != -1:
                cut = j + len(sep)
                break
        if cut >= len(text):
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p]


class ShardWriter:
    """Append token ids to `{split}-00000.bin`, `{split}-00001.bin`, ... of `shard_tokens` tokens each.

    Each shard is written to a temporary file and renamed into place when full (or at
    `close()`), so a shard file on disk is always complete.
    """

    def __init__(self, out: Path, split: str, *, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = (
            out,
            split,
            dtype.newbyteorder("<"),
            shard_tokens,
        )
        self.files: list[str] = []
        self.tokens = 0
        self.documents = 0
        self._sink: Generator[None, np.ndarray | None, None] | None = None
        self._in_shard = 0

    def write(self, ids: np.ndarray, *, documents: int = 0) -> None:
        self.documents += documents
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._sink is None:
                name = f"{self.split}-{len(self.files):05d}.bin"
                self._sink = _shard_sink(self.out / name)
                next(self._sink)
                self.files.append(name)
                self._in_shard = 0
            take = min(len(ids), self.shard_tokens - self._in_shard)
            self._sink.send(ids[:take])
            self._in_shard += take
            self.tokens += take
            ids = ids[take:]
            if self._in_shard == self.shard_tokens:
                self._commit()

    def close(self) -> None:
        if self._sink is not None:
            self._commit()

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def info(self) -> dict[str, Any]:
        return {"files": list(self.files), "tokens": self.tokens, "documents": self.documents}

    def _commit(self) -> None:
        assert self._sink is not None
        with contextlib.suppress(StopIteration):  # the generator ends once it has committed
            self._sink.send(None)
        self._sink = None


def _shard_sink(path: Path) -> Generator[None, np.ndarray | None, None]:
    # A generator keeps `atomic_path`'s with-block open across many writes: send(None)
    # commits (fsync + rename), close() unwinds it and the temporary file is deleted.
    from gpt2kit import atomic

    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        while (ids := (yield)) is not None:
            f.write(ids.tobytes())
            f.flush()  # a process killed from here on leaves these bytes in the temporary file
            pause_point("prepare.mid_shard")


def _join(docs: list[list[int]], *, eot: int, dtype: np.dtype) -> np.ndarray:
    """Concatenate token lists into one array, `eot` after each document."""
    total = sum(len(d) for d in docs) + len(docs)
    flat = itertools.chain.from_iterable(itertools.chain(d, (eot,)) for d in docs)
    return np.fromiter(flat, dtype=dtype, count=total)


def _documents(corpora: list[Corpus]) -> Iterator[str]:
    for corpus in corpora:
        yield from corpus


def _expand_lone_document(docs: Iterable[str]) -> Iterator[str]:
    it = iter(docs)
    first = next(it, None)
    if first is None:
        return
    second = next(it, None)
    if second is None:
        pieces = chunk_document(first)
        if len(pieces) > 1:
            log.info("one document: cut it into %d chunks at paragraph breaks for the split", len(pieces))
        yield from pieces
        return
    yield first
    yield second
    yield from it


def _batches(pairs: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    chars = 0
    for pair in pairs:
        batch.append(pair)
        chars += len(pair[1])
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tracked(pairs: Iterable[tuple[str, str]], corpora: list[Corpus], bar: Any) -> Iterator[tuple[str, str]]:
    """Pass `pairs` through, moving the progress bar to the bytes the corpora have read."""
    last = time.monotonic()
    for pair in pairs:
        yield pair
        now = time.monotonic()
        if now - last > 0.1:  # tqdm calls are not free; a few per second is plenty
            bar.update(sum(c.bytes_read for c in corpora) - bar.n)
            last = now
    bar.update(sum(c.bytes_read for c in corpora) - bar.n)


def _progress_bar(corpora: list[Corpus], desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    sizes = [c.total_bytes for c in corpora]
    total = sum(s for s in sizes if s is not None) if all(s is not None for s in sizes) else None
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _forget_previous(out: Path) -> dict[str, Any]:
    """Remove an earlier meta.json first, so a crash mid-way can't leave it describing new shards."""
    path = out / "meta.json"
    if not path.is_file():
        return {}
    try:
        old = token_data.read_meta(out)
    except DataError:
        old = {}
    path.unlink()
    return old


def _remove_crash_leftovers(out: Path) -> None:
    """Delete the temporary files a killed run left (a shard or meta.json half written).

    They never look like data (hidden, `.tmp`), but a shard's can be hundreds of MB.
    """
    for pattern in (".train-*.bin.*.tmp", ".val-*.bin.*.tmp", ".meta.json.*.tmp"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def _remove_stale_shards(out: Path, *, keep: set[str]) -> None:
    for split in ("train", "val"):
        for path in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].bin"):
            if path.name not in keep:
                path.unlink()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
