"""`gpt2kit prepare`: round trip, reproducible split, meta.json guards, shards, errors."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gpt2kit import Tokenizer
from gpt2kit.cli import main as cli_main
from gpt2kit.data.prepare import assign_splits, chunk_document, prepare
from gpt2kit.data.shards import TokenData, check_tokenizer, tokenizer_fingerprint
from gpt2kit.errors import ConfigError, DataError
from gpt2kit.tokenizer.tokenizer import bytes_to_unicode

WORDS = [
    "the",
    "king",
    "queen",
    "ghost",
    "sword",
    "crown",
    "night",
    "day",
    "love",
    "death",
    "王",
    "émigré",
    "naïve",
    "🙂",
]


def make_documents(n: int, *, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 6))
        ]
        docs.append(f"Document {i}.\n" + "\n".join(lines) + rng.choice(["", "\n", "\n\n", "  "]))
    docs.append("a literal <|endoftext|> inside text is just text")
    return docs


def write_inputs(tmp_path: Path, docs: list[str]) -> Path:
    """Half the documents as .txt files in a folder tree, half as lines of a .jsonl file."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    half = len(docs) // 2
    for i, doc in enumerate(docs[:half]):
        (folder / ("sub" if i % 2 else ".") / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
    with open(folder / "rest.jsonl", "w", encoding="utf-8") as f:
        for doc in docs[half:]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    return folder


def decoded_documents(data_dir: Path, split: str | None = None) -> list[str]:
    """Cut a split (default: train then val) at <|endoftext|> and decode each document strictly."""
    data = TokenData.open(data_dir)
    tok = data.tokenizer()
    out = []
    for name in [split] if split else ["train", "val"]:
        ids = np.asarray(data.tokens(name), dtype=np.int64)
        if not len(ids):
            continue
        assert ids[-1] == data.eot_token  # every document, the last included, ends with <|endoftext|>
        ends = np.flatnonzero(ids == data.eot_token)
        starts = np.concatenate([[0], ends[:-1] + 1])
        # strict decoding: a replacement character can't hide a broken round trip
        out += [
            tok.decode_bytes(ids[s:e].tolist()).decode("utf-8") for s, e in zip(starts, ends, strict=True)
        ]
    return out


def other_bpe_300(docs: list[str]) -> Tokenizer:
    """A different tokenizer of the same size as bpe:300 on `docs` (trained on the text reversed)."""
    from gpt2kit.tokenizer.bpe import train_bpe

    tok = train_bpe([d[::-1] for d in docs], vocab_size=300)
    assert tok.n_vocab == 300
    return tok


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_documents(300)


@pytest.fixture
def inputs(tmp_path: Path, docs: list[str]) -> Path:
    return write_inputs(tmp_path, docs)


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_gpt2(tmp_path: Path, inputs: Path, docs: list[str]) -> None:
    meta = prepare([str(inputs)], tmp_path / "data", val_fraction=0.1, progress=False)
    train, val = decoded_documents(tmp_path / "data", "train"), decoded_documents(tmp_path / "data", "val")
    assert Counter(train + val) == Counter(docs)
    assert meta["splits"]["train"]["documents"] == len(train) and meta["splits"]["val"]["documents"] == len(
        val
    )
    assert 10 <= len(val) <= 60  # ~10% of 301
    tok = Tokenizer.gpt2()
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == sum(
        len(tok.encode_ordinary(d)) + 1 for d in docs
    )
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"] == {
        "name": "gpt2",
        "n_vocab": 50257,
        "eot_token": 50256,
        "files": None,
        "sha256": tokenizer_fingerprint(tok),
    }
    assert not (tmp_path / "data" / "tokenizer").exists()
    assert meta["source"]["documents"] == len(docs)
    assert meta["source"]["inputs"][0]["files"] == 151  # 150 .txt + 1 .jsonl
    assert json.loads((tmp_path / "data" / "meta.json").read_text()) == meta


def test_round_trip_trained_bpe(tmp_path: Path, inputs: Path, docs: list[str]) -> None:
    meta = prepare([str(inputs)], tmp_path / "data", tokenizer="bpe:300", val_fraction=0.05, progress=False)
    assert meta["tokenizer"]["name"] == "bpe-300" and meta["tokenizer"]["files"] == "tokenizer"
    assert meta["tokenizer"]["n_vocab"] == 300 and meta["tokenizer"]["eot_token"] == 299
    assert (tmp_path / "data" / "tokenizer" / "vocab.json").is_file()
    train, val = decoded_documents(tmp_path / "data", "train"), decoded_documents(tmp_path / "data", "val")
    assert Counter(train + val) == Counter(docs)
    assert TokenData.open(tmp_path / "data").tokenizer().n_vocab == 300


def test_bpe_is_trained_on_the_train_split_only(tmp_path: Path) -> None:
    # A word repeated 500 times would surely become a token; it is only in the val document.
    docs = [f"common words number {i} here" for i in range(40)] + ["zqxj" * 500]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    seed = next(
        s for s in range(100) if ("val", "zqxj" * 500) in assign_splits(docs, val_fraction=0.05, seed=s)
    )
    prepare(
        [str(tmp_path / "d.jsonl")],
        tmp_path / "data",
        tokenizer="bpe:400",
        val_fraction=0.05,
        seed=seed,
        progress=False,
    )
    assert decoded_documents(tmp_path / "data", "val") == ["zqxj" * 500]
    vocab = json.loads((tmp_path / "data" / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert not any("zq" in token or "xj" in token for token in vocab)
    assert any("common" in token for token in vocab)


def test_round_trip_through_hf_dataset(tmp_path: Path, docs: list[str]) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    meta = prepare([f"hf:{tmp_path / 'ds'}"], tmp_path / "data", val_fraction=0.1, progress=False)
    both = decoded_documents(tmp_path / "data")
    assert Counter(both) == Counter(docs)
    assert meta["source"]["inputs"][0]["kind"] == "HuggingFace"


def test_existing_tokenizer_directory_is_copied(tmp_path: Path, inputs: Path, docs: list[str]) -> None:
    from gpt2kit.tokenizer.bpe import train_bpe

    tok = train_bpe(docs, vocab_size=280)
    tok.save(tmp_path / "mytok")
    meta = prepare([str(inputs)], tmp_path / "data", tokenizer=str(tmp_path / "mytok"), progress=False)
    assert meta["tokenizer"]["name"] == "mytok" and meta["tokenizer"]["files"] == "tokenizer"
    assert meta["tokenizer"]["sha256"] == tokenizer_fingerprint(tok)
    check_tokenizer(TokenData.open(tmp_path / "data"), Tokenizer.from_dir(tmp_path / "mytok"))


def test_uint32_when_the_vocabulary_exceeds_uint16(tmp_path: Path) -> None:
    # Every pair of bytes as a merge: 256 + 65536 + 1 tokens, more than uint16 can hold.
    chars = list(bytes_to_unicode().values())
    merges = [(a, b) for a in chars for b in chars]
    vocab = {ch: i for i, ch in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    Tokenizer(vocab, merges).save(tmp_path / "big")
    (tmp_path / "a.txt").write_text("¿ÿ~ zz\n" * 50)
    (tmp_path / "b.txt").write_text("other text")
    meta = prepare(
        [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
        tmp_path / "data",
        tokenizer=str(tmp_path / "big"),
        progress=False,
    )
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["n_vocab"] == 65793
    data = TokenData.open(tmp_path / "data")
    assert data.tokens("train").dtype == np.dtype("<u4")
    assert data.tokens("train").max() > 65535 or data.tokens("val").max() > 65535
    both = decoded_documents(tmp_path / "data")
    assert sorted(both) == sorted(["¿ÿ~ zz\n" * 50, "other text"])


def test_invalid_utf8_is_counted_in_meta(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 and more\n\n" * 20)
    meta = prepare([str(tmp_path / "a.txt")], tmp_path / "data", progress=False)
    assert meta["replaced_bytes"] == 20
    both = decoded_documents(tmp_path / "data")
    assert sum(d.count("\ufffd") for d in both) == 20


# --- the split ----------------------------------------------------------------------------------


def test_same_seed_identical_files_whatever_the_workers(tmp_path: Path, inputs: Path) -> None:
    prepare([str(inputs)], tmp_path / "a", val_fraction=0.1, seed=7, workers=1, progress=False)
    prepare([str(inputs)], tmp_path / "b", val_fraction=0.1, seed=7, workers=2, progress=False)
    for name in ["train-00000.bin", "val-00000.bin", "meta.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_different_seed_different_split(tmp_path: Path, inputs: Path) -> None:
    prepare([str(inputs)], tmp_path / "a", val_fraction=0.1, seed=1, progress=False)
    prepare([str(inputs)], tmp_path / "b", val_fraction=0.1, seed=2, progress=False)
    val_a, val_b = decoded_documents(tmp_path / "a", "val"), decoded_documents(tmp_path / "b", "val")
    assert Counter(val_a) != Counter(val_b)
    assert Counter(val_a + decoded_documents(tmp_path / "a", "train")) == Counter(
        val_b + decoded_documents(tmp_path / "b", "train")
    )


def test_at_least_one_val_document_and_it_depends_on_the_seed() -> None:
    docs = [f"doc {i}" for i in range(38)]  # like Shakespeare: 38 plays, 0.005 expects 0.19 of one
    chosen = set()
    for seed in range(20):
        pairs = list(assign_splits(docs, val_fraction=0.005, seed=seed))
        val = [d for s, d in pairs if s == "val"]
        assert len(val) >= 1
        assert sorted(d for _, d in pairs) == sorted(docs)
        chosen.add(tuple(val))
    assert len(chosen) > 5  # not always the same document


def test_no_val_when_fraction_is_zero_or_one_document(tmp_path: Path) -> None:
    assert [s for s, _ in assign_splits(["a", "b", "c"], val_fraction=0.0, seed=0)] == ["train"] * 3
    assert list(assign_splits(["tiny"], val_fraction=0.5, seed=0)) == [("train", "tiny")]
    (tmp_path / "a.txt").write_text("hello")
    meta = prepare([str(tmp_path / "a.txt")], tmp_path / "data", val_fraction=0.0, progress=False)
    assert meta["splits"]["val"] == {"files": [], "tokens": 0, "documents": 0}
    assert len(TokenData.open(tmp_path / "data").tokens("val")) == 0


def test_single_document_is_chunked_so_val_is_not_empty(tmp_path: Path) -> None:
    text = "\n\n".join(f"Paragraph {i}: " + "words " * (i % 17) for i in range(3000))
    (tmp_path / "one.txt").write_text(text)
    meta = prepare([str(tmp_path / "one.txt")], tmp_path / "data", progress=False)
    assert meta["splits"]["val"]["documents"] >= 1
    chunks = chunk_document(text)
    assert "".join(chunks) == text and 500 <= len(chunks) <= 1000
    both = decoded_documents(tmp_path / "data")
    assert Counter(both) == Counter(chunks)


@pytest.mark.parametrize(
    "text", ["", "x", "no breaks at all " * 100, "日本語のテキスト" * 500, "a\nb\nc\n" * 300, "\n\n" * 50]
)
def test_chunks_concatenate_to_the_text(text: str) -> None:
    chunks = chunk_document(text, chunks=37)
    assert "".join(chunks) == text
    assert all(chunks)
    assert len(chunks) <= 4 * 37


# --- shards and re-runs -----------------------------------------------------------------------


def test_shards_split_every_n_tokens(tmp_path: Path, inputs: Path) -> None:
    one = prepare([str(inputs)], tmp_path / "one", val_fraction=0.1, progress=False)
    many = prepare([str(inputs)], tmp_path / "many", val_fraction=0.1, shard_tokens=1000, progress=False)
    files = many["splits"]["train"]["files"]
    assert files[:3] == ["train-00000.bin", "train-00001.bin", "train-00002.bin"]
    assert len(files) == -(-one["splits"]["train"]["tokens"] // 1000)
    sizes = [(tmp_path / "many" / f).stat().st_size for f in files]
    assert all(s == 2000 for s in sizes[:-1]) and 0 < sizes[-1] <= 2000
    for split in ("train", "val"):
        a = TokenData.open(tmp_path / "one").tokens(split)
        b = TokenData.open(tmp_path / "many").tokens(split)
        assert np.array_equal(a, b)


def test_rerun_replaces_the_old_data(tmp_path: Path, inputs: Path) -> None:
    prepare([str(inputs)], tmp_path / "data", tokenizer="bpe:280", shard_tokens=500, progress=False)
    (tmp_path / "small.txt").write_text("just a little text\n\nand another paragraph\n")
    meta = prepare([str(tmp_path / "small.txt")], tmp_path / "data", progress=False)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        ["meta.json", *meta["splits"]["train"]["files"], *meta["splits"]["val"]["files"]]
    )
    assert TokenData.open(tmp_path / "data").tokenizer().name == "gpt2"


def test_no_temporary_files_are_left(tmp_path: Path, inputs: Path) -> None:
    prepare([str(inputs)], tmp_path / "data", shard_tokens=777, progress=False)
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]


# --- meta.json guards --------------------------------------------------------------------------


def test_check_tokenizer_refuses_another_tokenizer(tmp_path: Path, inputs: Path, docs: list[str]) -> None:
    prepare([str(inputs)], tmp_path / "data", tokenizer="bpe:300", progress=False)
    data = TokenData.open(tmp_path / "data")
    check_tokenizer(data, data.tokenizer())
    check_tokenizer(data, Tokenizer.from_dir(tmp_path / "data" / "tokenizer"))
    with pytest.raises(
        DataError, match=r"prepared with tokenizer 'bpe-300' \(300 tokens\) but 'gpt2' \(50257"
    ):
        check_tokenizer(data, Tokenizer.gpt2())
    # Same size, different merges: caught by the fingerprint, not the size.
    with pytest.raises(DataError, match=r"prepared with tokenizer 'bpe-300' \(300 tokens\) but 'bpe-300'"):
        check_tokenizer(data, other_bpe_300(docs))


def test_tampered_tokenizer_files_are_detected(tmp_path: Path, inputs: Path, docs: list[str]) -> None:
    prepare([str(inputs)], tmp_path / "data", tokenizer="bpe:300", progress=False)
    other_bpe_300(docs).save(tmp_path / "data" / "tokenizer")  # same size, other ids: loads fine
    with pytest.raises(DataError, match="differ from the ones the data was made with"):
        TokenData.open(tmp_path / "data").tokenizer()


# --- bad inputs -----------------------------------------------------------------------------------


def test_empty_input_is_an_error_and_keeps_old_data(tmp_path: Path, inputs: Path) -> None:
    prepare([str(inputs)], tmp_path / "data", progress=False)
    before = (tmp_path / "data" / "meta.json").read_text()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: no text found"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "data", progress=False)
    assert (tmp_path / "data" / "meta.json").read_text() == before


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"val_fraction": 1.0}, ConfigError, r"--val-fraction must be in \[0, 1\)"),
        ({"val_fraction": -0.1}, ConfigError, r"--val-fraction must be in \[0, 1\)"),
        ({"tokenizer": "bpe:many"}, ConfigError, "expected bpe:VOCAB_SIZE"),
        ({"tokenizer": "bpe:100"}, ConfigError, "out of range"),
        ({"tokenizer": "/no/such/dir"}, ConfigError, "not 'gpt2', 'bpe:VOCAB_SIZE' or a folder"),
        ({"workers": -1}, ConfigError, "--workers must be >= 1"),
    ],
)
def test_bad_options(tmp_path: Path, inputs: Path, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        prepare([str(inputs)], tmp_path / "data", progress=False, **kwargs)
    assert not (tmp_path / "data" / "meta.json").exists()


@pytest.mark.parametrize(
    ("argv_input", "setup", "message"),
    [
        ("missing.txt", None, "missing.txt: no such file or folder"),
        ("*.nothing", None, "the pattern matches no files"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"body": "x"}\n', "nofield.jsonl:1: no 'text' field"),
        ("empty.txt", "", "no text found"),
    ],
)
def test_cli_errors_exit_2_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    argv_input: str,
    setup: str | None,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        Path(argv_input).write_text(setup)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["prepare", argv_input, "--out", "data", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpt2kit prepare: error: ") and message in err[-1]


def test_cli_prints_a_summary(tmp_path: Path, inputs: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["prepare", str(inputs), "--out", str(tmp_path / "d"), "--val-fraction", "0.1", "--seed", "3"]
        )
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "tokenizer gpt2 (50257 tokens), uint16" in captured.out
    assert "train:" in captured.out and "val:" in captured.out
    assert "B/s" in captured.err  # the progress bar, on stderr
    assert TokenData.open(tmp_path / "d").meta["seed"] == 3


@pytest.mark.slow
def test_full_shakespeare_bpe_4096(tmp_path: Path) -> None:
    from gpt2kit.data.corpora import shakespeare_documents

    meta = prepare(["shakespeare"], tmp_path / "shk", tokenizer="bpe:4096", progress=False)
    assert meta["tokenizer"]["n_vocab"] == 4096
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 37
    both = decoded_documents(tmp_path / "shk")
    assert Counter(both) == Counter(shakespeare_documents())
