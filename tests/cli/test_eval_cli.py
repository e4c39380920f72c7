"""`gpt2kit eval` refuses bad flags and files in one line, exit 2, before loading the model."""

from __future__ import annotations

import json

import pytest

from gpt2kit.cli import main


def run_eval(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of `gpt2kit eval ARGV`."""
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err.strip().splitlines()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("Some text to score.\n", encoding="utf-8")
    return path


def missing_model(tmp_path) -> str:
    """A --model that can't load: an error about anything else shows the check ran first."""
    return str(tmp_path / "no-such-model")


def test_output_that_is_a_directory_is_refused_before_the_model_loads(tmp_path, text_file, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    argv = ["--task", "perplexity", "--data", str(text_file), "--output", str(folder)]
    code, out, err = run_eval(capsys, "--model", missing_model(tmp_path), *argv)
    assert code == 2 and out == ""
    assert err == [
        f"gpt2kit eval: error: --output {folder}: is a directory; pass a file path such as "
        f"{folder / 'results.json'}"
    ]


def test_output_whose_folder_cant_be_created_is_refused(tmp_path, text_file, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    output = blocker / "sub" / "r.json"
    argv = ["--task", "perplexity", "--data", str(text_file), "--output", str(output)]
    code, _, err = run_eval(capsys, "--model", missing_model(tmp_path), *argv)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(
        f"gpt2kit eval: error: --output {output}: can't create its folder {output.parent}"
    )
    assert blocker.read_text(encoding="utf-8") == "not a folder"


@pytest.mark.parametrize("loadable", [True, False])
def test_too_many_shots_fail_at_once_without_a_progress_bar(tmp_path, tiny_hf_dir, capsys, loadable):
    model = str(tiny_hf_dir) if loadable else missing_model(tmp_path)
    argv = ["--model", model, "--task", "lambada", "--data", "lambada_sample", "--shots", "50"]
    code, out, err = run_eval(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err) == 1, err  # no tqdm fragment before the message
    assert (
        err[0].startswith("gpt2kit eval: error: ") and "lambada_sample.jsonl: --shots 50 needs 50" in err[0]
    )
    assert "--fewshot-data FILE" in err[0]


def test_a_choice_longer_than_the_context_is_one_line_with_file_and_line(tmp_path, tiny_hf_dir, capsys):
    path = tmp_path / "long.jsonl"
    rows = [
        {"context": "Fine:", "choices": ["a", "b"], "label": 0},
        {"context": "Too long:", "choices": ["word " * 200, "short"], "label": 1},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["--model", str(tiny_hf_dir), "--task", "multiple-choice", "--data", str(path)]
    code, out, err = run_eval(capsys, *argv)
    assert code == 2 and out == ""
    assert err == [
        f"gpt2kit eval: error: {path}:2: choice 0 is 201 tokens, longer than the model's context of 128; "
        "shorten it or use a model with a longer context"
    ]


@pytest.mark.parametrize(
    "flags",
    [
        ["--shots", "0"],
        ["--shots", "3"],
        ["--limit", "5"],
        ["--fewshot-data", "x.jsonl"],
        ["--description", "d"],
    ],
)
def test_task_file_flags_are_refused_for_perplexity(tmp_path, text_file, capsys, flags):
    argv = ["--model", missing_model(tmp_path), "--task", "perplexity", "--data", str(text_file), *flags]
    code, _, err = run_eval(capsys, *argv)
    assert code == 2
    assert err == [
        f"gpt2kit eval: error: {flags[0]}: only for the JSONL task kinds (lambada, multiple-choice, "
        "generate), not --task perplexity; drop it"
    ]


def test_stride_is_refused_for_task_files(tmp_path, capsys):
    argv = ["--model", missing_model(tmp_path), "--task", "lambada", "--data", "lambada_sample"]
    code, _, err = run_eval(capsys, *argv, "--stride", "8")
    assert code == 2
    assert err == ["gpt2kit eval: error: --stride: only for --task perplexity, not --task lambada; drop it"]


def test_perplexity_records_no_shots(tiny_hf_dir, text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--model", str(tiny_hf_dir), "--task", "perplexity", "--data", str(text_file)]
    code, _, _ = run_eval(capsys, *argv, "--output", str(out))
    assert code == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["shots"] is None and settings["limit"] is None


@pytest.mark.parametrize("task", ["perplexity", "multiple-choice", "generate"])
def test_target_is_only_for_lambada(tmp_path, text_file, capsys, task):
    data = str(text_file) if task == "perplexity" else "qa_sample"
    argv = ["--model", missing_model(tmp_path), "--task", task, "--data", data, "--target", "token"]
    code, _, err = run_eval(capsys, *argv)
    assert code == 2
    assert err == [f"gpt2kit eval: error: --target: only for --task lambada, not --task {task}; drop it"]


def test_lambada_target_flag(tiny_hf_dir, tmp_path, capsys):
    from gpt2kit.evals.lambada import evaluate_lambada
    from gpt2kit.evals.tasks import load_task
    from gpt2kit.model import GPT2
    from gpt2kit.model.checkpoint import load_tokenizer

    task = load_task("lambada_sample", kind="lambada")
    model, tok = GPT2.from_pretrained(tiny_hf_dir), load_tokenizer(tiny_hf_dir)
    for target in (None, "word", "token"):
        out = tmp_path / f"{target}.json"
        argv = ["--model", str(tiny_hf_dir), "--task", "lambada", "--data", "lambada_sample"]
        code, stdout, _ = run_eval(
            capsys, *argv, *(["--target", target] if target else []), "--output", str(out)
        )
        assert code == 0
        doc = json.loads(out.read_text())
        assert doc["settings"]["target"] == (target or "word")
        assert f"target={target or 'word'}" in stdout
        expected = evaluate_lambada(model, tok, task, target=target or "word")["metrics"]
        assert doc["metrics"] == pytest.approx(expected)
