"""Input readers: files, folders, globs, JSON Lines, Hugging Face datasets, the Shakespeare corpus."""

from __future__ import annotations

import codecs
import json
import logging
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt2kit.data.corpora import (
    Files,
    HuggingFace,
    decode_utf8,
    markdown_play_to_text,
    open_corpus,
    parse_hf_spec,
    shakespeare_documents,
    shakespeare_text,
)
from gpt2kit.errors import DataError

# --- UTF-8 with replacement -----------------------------------------------------------------


_counted: list[int] = []


def _count_and_replace(e: UnicodeDecodeError) -> tuple[str, int]:
    _counted.append(e.end - e.start)
    return "\ufffd", e.end


codecs.register_error("test-count-replace", _count_and_replace)


@given(st.binary(max_size=200))
def test_decode_utf8_equals_replace_and_counts_bad_bytes(data: bytes) -> None:
    _counted.clear()
    expected = data.decode("utf-8", "test-count-replace")  # an independent oracle: Python's own hook
    assert decode_utf8(data) == (expected, sum(_counted))
    assert expected == data.decode("utf-8", "replace")


def test_decode_utf8_examples() -> None:
    assert decode_utf8("héllo".encode()) == ("héllo", 0)
    assert decode_utf8(b"caf\xe9") == ("caf\ufffd", 1)
    assert decode_utf8(b"\xff\xfeab\xc3") == ("\ufffd\ufffdab\ufffd", 3)
    assert decode_utf8("\ufffd".encode()) == ("\ufffd", 0)  # a real U+FFFD is not a replaced byte


# --- files, folders, globs ------------------------------------------------------------------


def test_text_file_is_one_document(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first line\n\nsecond paragraph\n", encoding="utf-8")
    corpus = open_corpus(str(tmp_path / "a.txt"))
    assert list(corpus) == ["first line\n\nsecond paragraph\n"]
    assert corpus.bytes_read == corpus.total_bytes == (tmp_path / "a.txt").stat().st_size


def test_folder_reads_text_files_recursively_sorted_skipping_hidden_and_other(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("A")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "C1"}\n{"text": "C2"}\n')
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    assert list(open_corpus(str(tmp_path))) == ["B", "A", "C1", "C2"]


def test_folder_without_text_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text("print()")
    with pytest.raises(DataError, match=r"no \.txt.*glob"):
        open_corpus(str(tmp_path))


def test_glob_matches_sorted_files(tmp_path: Path) -> None:
    for name in ["b.py", "a.py", "c.txt"]:
        (tmp_path / name).write_text(name)
    assert list(open_corpus(str(tmp_path / "*.py"))) == ["a.py", "b.py"]
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f.py").write_text("deep")
    assert list(open_corpus(str(tmp_path / "**" / "*.py"))) == ["a.py", "b.py", "deep"]


def test_glob_matching_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="matches no files"):
        open_corpus(str(tmp_path / "*.txt"))


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        open_corpus(str(tmp_path / "nope.txt"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    with pytest.raises(DataError, match="can't read it"):
        list(open_corpus(str(path)))


def test_unreadable_file_is_an_error_even_as_root(tmp_path: Path) -> None:
    # A file that vanishes between listing and reading fails the same way whoever runs it.
    path = tmp_path / "gone.txt"
    path.write_text("x")
    corpus = open_corpus(str(path))
    path.unlink()
    with pytest.raises(DataError, match=r"gone\.txt: can't read it"):
        list(corpus)


def test_invalid_utf8_is_replaced_counted_and_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café naïve".encode("latin-1"))
    corpus = open_corpus(str(path))
    with caplog.at_level(logging.WARNING):
        docs = list(corpus)
    assert docs == ["caf\ufffd na\ufffdve"]
    assert corpus.replaced_bytes == 2
    assert "latin1.txt: 2 bytes are not valid UTF-8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        list(corpus)  # a second pass (BPE training reads twice) counts again but warns once
    assert corpus.replaced_bytes == 2
    assert not caplog.text


def test_empty_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("b")
    assert list(open_corpus(str(tmp_path))) == ["b"]


# --- JSON Lines ---------------------------------------------------------------------------


def test_jsonl_one_document_per_line_with_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [{"text": "one\nline"}, {"text": "two", "id": 2}, {"text": ""}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    assert list(open_corpus(str(path))) == ["one\nline", "two"]  # blank lines and empty texts skipped
    path.write_text(json.dumps({"body": "x"}) + "\n")
    assert list(open_corpus(str(path), field="body")) == ["x"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"d\.jsonl:2: not valid JSON"),
        ('{"title": "x"}', r"d\.jsonl:2: no 'text' field \(fields: title\); pass --field NAME"),
        ('{"text": 5}', r"d\.jsonl:2: field 'text' is int, not a string"),
        ('["text"]', r"d\.jsonl:2: expected a JSON object"),
    ],
)
def test_jsonl_bad_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        list(open_corpus(str(path)))


# --- Hugging Face datasets -------------------------------------------------------------------


def test_parse_hf_spec() -> None:
    assert parse_hf_spec("hf:user/data") == ("user/data", None, "train")
    assert parse_hf_spec("hf:user/data:test") == ("user/data", None, "test")
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:validation") == (
        "wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    with pytest.raises(DataError, match="expected hf:NAME"):
        parse_hf_spec("hf:")
    with pytest.raises(DataError, match="expected hf:NAME"):
        parse_hf_spec("hf:a:b:c:d")


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["alpha", "", "gamma ünïcode"], "n": [1, 2, 3]})
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    corpus = open_corpus(f"hf:{tmp_path / 'dd'}")
    assert isinstance(corpus, HuggingFace)
    assert list(corpus) == ["alpha", "gamma ünïcode"]
    assert corpus.total_bytes == corpus.bytes_read == len("alphagamma ünïcode".encode())
    assert list(open_corpus(f"hf:{tmp_path / 'dd'}:test")) == ["alpha"]
    with pytest.raises(DataError, match=r"no split 'valid' \(have: train, test\)"):
        list(open_corpus(f"hf:{tmp_path / 'dd'}:valid"))
    with pytest.raises(DataError, match=r"no 'body' column \(columns: text, n\); pass --field NAME"):
        list(open_corpus(f"hf:{tmp_path / 'dd'}", field="body"))
    ds.save_to_disk(str(tmp_path / "single"))  # a plain Dataset, no splits
    assert list(open_corpus(f"hf:{tmp_path / 'single'}")) == ["alpha", "gamma ünïcode"]


def test_hf_local_data_files_stream(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(5)))
    corpus = open_corpus(f"hf:{tmp_path / 'a.jsonl'}", field="content")
    assert list(corpus) == [f"doc {i}" for i in range(5)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "b.parquet")
    assert list(open_corpus(f"hf:{tmp_path / 'b.parquet'}")) == ["p1", "p2"]
    with pytest.raises(DataError, match=r"no 'text' column \(columns: content\)"):
        list(open_corpus(f"hf:{tmp_path / 'a.jsonl'}"))


def test_hf_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        list(open_corpus(f"hf:{tmp_path / 'missing.jsonl'}"))


# --- Shakespeare ------------------------------------------------------------------------------


def test_shakespeare_is_38_plain_text_plays() -> None:
    docs = shakespeare_documents()
    assert len(docs) == 38
    titles = [d.splitlines()[0] for d in docs]
    assert "Hamlet" in titles and "Measure for Measure" in titles and "The Tempest" in titles
    text = shakespeare_text()
    assert 4_500_000 < len(text) < 5_500_000
    for markup in ("**", "_", "#", "\\", "&amp;", "  \n"):
        assert markup not in text
    hamlet = docs[titles.index("Hamlet")]
    assert (
        "HAMLET:\nTo be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        in hamlet
    )
    assert (
        "\n\nACT III\n\n" in hamlet and "\n\nSCENE I. Elsinore. A platform before the castle.\n\n" in hamlet
    )
    assert "\n\n[Enter Ghost]\n\n" in hamlet


def test_markdown_play_to_text_handles_the_markup_found_in_the_plays() -> None:
    md = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n"
        "_Thunder. Enter two\nWitches_\n\n"
        "**First Witch**  \nWhen shall we  \nmeet again\\--soon?\n\n"
        "**MISTRESS QUICKLY**  \n[Aside to SIMPLE]_  \nI am glad &amp; c.\n\n"
        "**BOTTOM**  \n__\\[Awaking]_  \nWhen my cue comes\n\n"
        "*[He draws his sword.]*\n"
    )
    assert markdown_play_to_text(md) == (
        "A Play\n\nACT I\n\nSCENE I. A heath.\n\n[Thunder. Enter two Witches]\n\n"
        "First Witch:\nWhen shall we\nmeet again--soon?\n\n"
        "MISTRESS QUICKLY:\n[Aside to SIMPLE]\nI am glad & c.\n\n"
        "BOTTOM:\n[Awaking]\nWhen my cue comes\n\n"
        "[He draws his sword.]\n"
    )


def test_shakespeare_corpus_counts_bytes() -> None:
    corpus = open_corpus("shakespeare")
    docs = list(corpus)
    assert corpus.bytes_read == corpus.total_bytes == sum(len(d.encode()) for d in docs)
    assert corpus.describe()["plays"] == 38


def test_files_corpus_describes_itself(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc")
    corpus = open_corpus(str(tmp_path))
    assert isinstance(corpus, Files)
    assert corpus.describe() == {"input": str(tmp_path), "kind": "Files", "files": 1, "bytes": 3}
