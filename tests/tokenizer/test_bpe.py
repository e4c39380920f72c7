"""Training a byte-level BPE: canonical GPT-2 numbering, loads everywhere, same encoding as HF."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2kit import Tokenizer
from gpt2kit.data.corpora import shakespeare_text
from gpt2kit.errors import ConfigError
from gpt2kit.tokenizer.bpe import canonical_vocab, train_bpe
from gpt2kit.tokenizer.tokenizer import bytes_to_unicode

VOCAB = 512


@pytest.fixture(scope="module")
def corpus() -> str:
    return shakespeare_text()[:200_000]  # ~200 KB: trains in well under a second


@pytest.fixture(scope="module")
def trained(corpus: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Path]:
    tok = train_bpe(corpus.split("\n\n"), vocab_size=VOCAB)
    path = tmp_path_factory.mktemp("bpe")
    tok.save(path)
    return tok, path


def hf_from_files(path: Path):  # the reference implementation of BPE on the same files
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def test_vocabulary_has_gpt2_numbering(trained: tuple[Tokenizer, Path]) -> None:
    tok, path = trained
    assert tok.n_vocab == VOCAB and tok.eot_token == VOCAB - 1 and tok.name == f"bpe-{VOCAB}"
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (path / "merges.txt").read_text("utf-8").splitlines()[1:]]
    assert len(merges) == VOCAB - 257
    # 256 byte tokens in bytes_to_unicode order, like GPT-2's encoder.json ("!" is 0) ...
    assert [vocab[ch] for ch in bytes_to_unicode().values()] == list(range(256))
    for i, b in enumerate(bytes_to_unicode()):
        assert tok.decode_bytes([i]) == bytes([b])
    # ... then one token per merge in merge order, then <|endoftext|> last.
    assert [vocab[a + b] for a, b in merges] == list(range(256, VOCAB - 1))
    assert vocab["<|endoftext|>"] == VOCAB - 1
    assert (path / "tokenizer_config.json").is_file()


def test_same_ids_as_gpt2_files_use(trained: tuple[Tokenizer, Path]) -> None:
    # GPT-2's own vocabulary follows the same layout: our numbering of its first bytes agrees.
    gpt2 = Tokenizer.gpt2()
    tok, _ = trained
    assert [tok.decode_bytes([i]) for i in range(256)] == [gpt2.decode_bytes([i]) for i in range(256)]


def test_loads_through_from_dir_and_encodes_like_hf_tokenizers(
    trained: tuple[Tokenizer, Path], corpus: str
) -> None:
    tok, path = trained
    loaded = Tokenizer.from_dir(path)
    hf = hf_from_files(path)
    for text in [corpus, shakespeare_text()[-50_000:], "Hello world!\n\n  tabs\tand 'quotes' don't 123"]:
        ids = loaded.encode_ordinary(text)
        assert ids == tok.encode_ordinary(text)
        assert ids == hf.encode(text).ids
        assert loaded.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_random_unicode_round_trips_and_matches_hf(trained: tuple[Tokenizer, Path], text: str) -> None:
    tok, path = trained
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert ids == _hf_cached(path).encode(text).ids


_HF: dict[Path, object] = {}


def _hf_cached(path: Path):
    if path not in _HF:
        _HF[path] = hf_from_files(path)
    return _HF[path]


def test_loads_through_transformers_autotokenizer(trained: tuple[Tokenizer, Path], corpus: str) -> None:
    from transformers import AutoTokenizer

    tok, path = trained
    auto = AutoTokenizer.from_pretrained(str(path))
    sample = corpus[:5000] + " émigré 日本語 🙂"
    assert auto.encode(sample) == tok.encode_ordinary(sample)
    assert auto.decode(tok.encode_ordinary(sample)) == sample
    assert auto.eos_token_id == tok.eot_token


def test_round_trips_all_of_shakespeare(trained: tuple[Tokenizer, Path]) -> None:
    tok, _ = trained
    text = shakespeare_text()
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert len(ids) < 0.6 * len(text.encode())  # it learned something: ~1.9 bytes per token at 512


def test_training_is_deterministic(corpus: str) -> None:
    a = train_bpe([corpus[:50_000]], vocab_size=300)
    b = train_bpe([corpus[:50_000]], vocab_size=300)
    assert [a.decode_bytes([i]) for i in range(300)] == [b.decode_bytes([i]) for i in range(300)]


def test_small_text_gives_smaller_vocabulary_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tok = train_bpe(["ab ab ab ab"], vocab_size=1000)
    assert 257 < tok.n_vocab < 1000 and tok.eot_token == tok.n_vocab - 1
    assert "too few repeated pairs" in caplog.text
    assert tok.decode(tok.encode("ab ba")) == "ab ba"


@pytest.mark.parametrize("size", [0, 256, 2**21])
def test_vocab_size_out_of_range(size: int) -> None:
    with pytest.raises(ConfigError, match=r"out of range; use 257\.\.1048576"):
        train_bpe(["x"], vocab_size=size)


def test_canonical_vocab_drops_repeated_results() -> None:
    vocab, merges = canonical_vocab([("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c")])
    assert merges == [("a", "b"), ("ab", "c"), ("b", "c")]
    assert vocab["ab"] == 256 and vocab["abc"] == 257 and vocab["bc"] == 258 and vocab["<|endoftext|>"] == 259
