"""Task files: our JSON Lines, LAMBADA / HellaSwag public formats, few-shot prompts, clear errors."""

from __future__ import annotations

import json

import pytest

from gpt2kit.cli import main
from gpt2kit.errors import DataError
from gpt2kit.evals.tasks import builtin_task_dir, check_shots, fewshot_prefix, load_task


def write_jsonl(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("lambada_sample", "lambada"),
        ("multiple_choice_sample", "multiple-choice"),
        ("qa_sample", "generate"),
        ("translate_sample", "generate"),
    ],
)
def test_bundled_samples_load(name, kind):
    task = load_task(name, kind=kind)
    assert task.path == builtin_task_dir() / f"{name}.jsonl"
    assert len(task.items) >= 24 and len(task.pool) >= 5
    assert all(it.split is None for it in task.items) and all(it.split == "train" for it in task.pool)
    assert len(task.sha256) == 64
    prefix = fewshot_prefix(task, task.items[0], shots=3, seed=0)
    assert prefix.count(task.example_separator) >= 3


def test_multiple_choice_sample_labels_vary():
    task = load_task("multiple_choice_sample", kind="multiple-choice")
    assert len({it.label for it in task.items}) == 4
    assert all(len(it.choices) == 4 for it in task.items)


def test_translation_prompt_is_built_as_in_seed_001():
    task = load_task("translate_sample", kind="generate")
    item = task.items[0]
    prompt = fewshot_prefix(task, item, shots=2, seed=3) + item.context
    lines = prompt.split("\n")
    assert lines[0] == "Translate English to French:"
    assert all(" => " in line for line in lines[1:3])
    assert lines[3] == "cheese =>"
    assert fewshot_prefix(task, item, shots=0, seed=3) == "Translate English to French:\n"


def test_hellaswag_fields_load_with_lm_eval_preprocessing(tmp_path):
    rows = [
        {
            "ind": 24,
            "activity_label": "Roof shingle removal",
            "ctx_a": "A man is sitting on a roof.",
            "ctx_b": "he",
            "ctx": "A man is sitting on a roof. he",
            "split": "val",
            "label": 3,
            "endings": [
                "is using wrap to wrap a pair of skis.",
                "is ripping level tiles off.",
                "is holding a rubik's cube.",
                "starts pulling up roofing on a roof.",
            ],
        },
        {
            "activity_label": "Home and Garden",
            "ctx": "[header] How to plant tulips [title] Pick a sunny spot.",
            "split": "val",
            "label": "0",
            "endings": ["[step] Dig  holes.", "Paint the bulbs.", "Eat the bulbs.", "Sell the garden."],
        },
    ]
    task = load_task(write_jsonl(tmp_path / "hellaswag_val.jsonl", rows), kind="multiple-choice")
    first, second = task.items
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.label == 3 and first.choices[3] == "starts pulling up roofing on a roof."
    assert second.context == "Home and Garden: How to plant tulips. Pick a sunny spot."
    assert second.label == 0 and second.choices[0] == " Dig holes."


def test_openai_lambada_jsonl_text_field(tmp_path):
    path = write_jsonl(
        tmp_path / "lambada_test.jsonl", [{"text": "In the end he gave the ring back to Frodo"}]
    )
    (item,) = load_task(path, kind="lambada").items
    assert (item.context, item.targets) == ("In the end he gave the ring back to", ("Frodo",))


def test_few_shot_is_reproducible_and_never_shows_the_query(tmp_path):
    rows = [{"prompt": f"Q: {i} + 1 =", "answer": str(i + 1)} for i in range(8)]
    path = write_jsonl(tmp_path / "sums.jsonl", rows)
    # The pool is the same file: every item is also a candidate example for the others.
    task = load_task(path, kind="generate", fewshot_path=path)
    assert len(task.pool) == 8
    for item in task.items:
        prefix = fewshot_prefix(task, item, shots=7, seed=11)  # all the others, never the item itself
        assert item.context not in prefix
        assert prefix.count("\n\n") == 7
        assert prefix == fewshot_prefix(task, item, shots=7, seed=11)
    a = [fewshot_prefix(task, it, shots=3, seed=1) for it in task.items]
    b = [fewshot_prefix(task, it, shots=3, seed=2) for it in task.items]
    assert a == [fewshot_prefix(task, it, shots=3, seed=1) for it in task.items]
    assert a != b
    # Independent of --limit: the third item gets the same examples either way.
    assert fewshot_prefix(task.limit(3), task.items[2], shots=3, seed=1) == a[2]
    with pytest.raises(DataError, match="--shots 8 needs 8 example items but the pool has 7"):
        fewshot_prefix(task, task.items[0], shots=8, seed=1)


def test_split_train_items_are_the_pool_and_not_scored(tmp_path):
    rows = [
        {"task": {"description": "Add one."}},
        {"prompt": "1 + 1 =", "answer": "2", "split": "train"},
        {"prompt": "2 + 1 =", "answer": "3", "split": "train"},
        {"prompt": "5 + 1 =", "answer": "6", "split": "test"},
    ]
    task = load_task(write_jsonl(tmp_path / "t.jsonl", rows), kind="generate")
    assert [it.context for it in task.items] == ["5 + 1 ="]
    assert [it.context for it in task.pool] == ["1 + 1 =", "2 + 1 ="]
    prefix = fewshot_prefix(task, task.items[0], shots=2, seed=0)
    assert prefix.startswith("Add one.\n\n")
    assert sorted(prefix.split("\n\n")[1:3]) == ["1 + 1 = 2", "2 + 1 = 3"]
    with pytest.raises(DataError, match="--shots 3 needs 3 example items"):
        fewshot_prefix(task, task.items[0], shots=3, seed=0)


@pytest.mark.parametrize(
    ("kind", "lines", "message"),
    [
        ("generate", ['{"prompt": "a", "answer": "b"}', "{oops"], r":2: not valid JSON"),
        ("generate", ["[1, 2]"], r":1: expected a JSON object"),
        ("generate", ['{"prompt": "a"}'], r":1: a generate item needs"),
        ("generate", ['{"prompt": "", "answer": "b"}'], r'"prompt" must be a non-empty string'),
        (
            "multiple-choice",
            ['{"context": "a", "choices": ["x", "y"], "label": 2}'],
            r'"label" must be the index',
        ),
        ("multiple-choice", ['{"context": "a", "choices": ["x"], "label": 0}'], r"at least 2 strings"),
        (
            "multiple-choice",
            ['{"ctx": "a", "endings": ["x", "y"], "label": ""}'],
            r'"label" must be the index',
        ),
        ("multiple-choice", ['{"question": "a"}'], r"needs \"context\" \+ \"choices\""),
        ("lambada", ['{"context": "a b"}'], r'"target" must be a non-empty string'),
        ("lambada", ["oneword"], r"context and a last word"),
        (
            "lambada",
            ['{"context": "a", "target": "b", "split": "train"}'],
            r'every item has "split": "train"',
        ),
        (
            "lambada",
            ['{"task": {"colour": "red"}}', '{"context": "a", "target": "b"}'],
            r'"task" must be an object',
        ),
        ("lambada", ["", "  "], r"no passages"),
    ],
)
def test_bad_task_files_raise_data_error(tmp_path, kind, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_task(path, kind=kind)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_task(tmp_path / "nope.jsonl", kind="lambada")
    with pytest.raises(DataError, match="is a directory"):
        load_task(tmp_path, kind="lambada")
    binary = tmp_path / "x.jsonl"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        load_task(binary, kind="generate")


def test_cli_bad_task_file_exits_2_with_one_line(tmp_path, tiny_hf_dir, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "choices": ["x", "y"]}\n', encoding="utf-8")
    argv = ["eval", "--model", str(tiny_hf_dir), "--task", "multiple-choice", "--data", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("gpt2kit eval: error: ") and "bad.jsonl:1:" in err[0] and '"label"' in err[0]


ONE_ITEM = {
    "lambada": {"context": "a", "target": "c"},
    "multiple-choice": {"context": "a", "choices": ["b", "c"], "label": 1},
    "generate": {"prompt": "a", "answer": "c"},
}


@pytest.mark.parametrize("kind", ["lambada", "multiple-choice", "generate"])
def test_a_byte_order_mark_is_skipped(tmp_path, kind):
    """A JSONL file saved with a BOM (Windows editors) still reads as JSON, not as LAMBADA text."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ONE_ITEM[kind]).encode("utf-8") + b"\r\n")
    (item,) = load_task(path, kind=kind).items
    assert item.context == "a" and item.answer == "c" and item.line == 1


@pytest.mark.parametrize("kind", ["lambada", "multiple-choice", "generate"])
@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_file_asks_for_json_lines(tmp_path, kind, indent):
    path = tmp_path / "array.json"
    path.write_text("\n" + json.dumps([ONE_ITEM[kind]] * 2, indent=indent) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_task(path, kind=kind)
    message = str(info.value)
    assert message.startswith(f"{path}:2: expected a JSON object per line, found a JSON array")
    assert "convert the file to JSON Lines, one object per line" in message and "\n" not in message


def test_lambada_text_may_start_with_a_bracket(tmp_path):
    """Only a real JSON array is refused: a plain-text passage starting with "[" still loads."""
    path = tmp_path / "lambada.txt"
    path.write_text("[Chapter one] he opened the door\n", encoding="utf-8")
    (item,) = load_task(path, kind="lambada").items
    assert (item.context, item.targets) == ("[Chapter one] he opened the", ("door",))


def test_check_shots_needs_enough_examples_for_every_item(tmp_path):
    rows = [
        {"prompt": "1 =", "answer": "1", "split": "train"},
        {"prompt": "2 =", "answer": "2", "split": "train"},
        {"prompt": "3 =", "answer": "3"},
        {"prompt": "1 =", "answer": "1"},  # equal to a pool item: that one is never its example
    ]
    task = load_task(write_jsonl(tmp_path / "t.jsonl", rows), kind="generate")
    check_shots(task, 0)
    check_shots(task.limit(1), 2)
    with pytest.raises(DataError, match=r"t.jsonl: --shots 2 needs 2 example items but the pool has 1;"):
        check_shots(task, 2)
    with pytest.raises(DataError, match="--shots must be >= 0"):
        check_shots(task, -1)


def test_a_line_separator_inside_a_json_string_stays_in_its_item(tmp_path):
    # json.dumps(..., ensure_ascii=False) writes U+2028 raw; only "\n" ends a JSON Lines record.
    path = tmp_path / "mc.jsonl"
    rows = [{"context": "Pick\u2028one:", "choices": ["a\u2029b", "c"], "label": 0}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    task = load_task(path, kind="multiple-choice")
    assert [(it.context, it.choices, it.line) for it in task.items] == [
        ("Pick\u2028one:", ("a\u2029b", "c"), 1)
    ]
