"""EleutherAI's lm-evaluation-harness, a client nobody here wrote, agrees with `gpt2kit eval`.

One small task set (LAMBADA-style, multiple choice, rolling perplexity) on a tiny random
gpt2kit model, three ways:
- lm-eval's `hf` backend on the saved model folder (transformers runs the model);
- lm-eval's `local-completions` against a real `gpt2kit serve` process, with
  `tokenizer_backend=remote` (the server's /tokenizer_info, /tokenize, /detokenize);
- `gpt2kit eval`.
Accuracies must be equal and perplexities agree to 1e-3 relative. The recipe is the one
docs/evaluation.md gives.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from gpt2kit import GPT2, GPT2Config, Tokenizer
from gpt2kit.cli import main

lm_eval = pytest.importorskip("lm_eval")

N_CTX = 128
SERVED = "tiny"
CONTEXTS = [
    "The old man walked slowly down the",
    "After the storm had passed, the children ran outside to see the",
    "She poured the tea and handed him a",
    "In the middle of the night we heard a strange",
    "The committee decided to postpone the",
    "He opened the letter and read the first",
    "They built a small wooden boat and sailed across the",
    "At the end of the long corridor there was a",
    "The recipe calls for two cups of",
    "When the music stopped, everyone looked at the",
    "The train was late again, so she took a",
    "Before the exam he spent the whole weekend reading his",
]
MISSES = ["house", "river", "window", "garden", "morning", "answer"]
MC = [
    ("The sky on a clear day is", ["blue", "a loud trumpet of enormous size", "green", "square"], 0),
    ("To boil water you need", ["heat", "a violin", "patience and a very large pot of soup", "ice"], 0),
    ("A cat likes to chase", ["mice", "tax returns", "the concept of a Tuesday afternoon", "clouds"], 0),
    ("Bread is made from", ["flour", "glass", "old newspapers and a lot of good intentions", "sand"], 0),
    ("The opposite of hot is", ["cold", "purple", "a committee meeting", "loud"], 0),
    ("Fish live in", ["water", "the attic of a haunted house", "trees", "shoes"], 0),
    ("At night you can see the", ["moon", "the sound of", "Wednesday", "a long and winding road"], 0),
    ("A square has four", ["sides", "wheels", "opinions about modern art", "wings"], 0),
]
SHORT_TEXT = (
    "The lighthouse keeper climbed the stairs every evening. He lit the lamp, wound the clock, "
    "and wrote one line in the logbook before the ships came in."
)
LONG_TEXT = " ".join(
    f"Chapter {i}. The river bent east past the mill, where the miller counted sacks of grain "
    f"and argued with the ferryman about the price of rope, the weather, and the number {i * 7}."
    for i in range(1, 13)
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm-eval")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    """A random gpt2kit model, saved as gpt2kit saves every model (transformers' layout)."""
    torch.manual_seed(2024)
    model = GPT2(GPT2Config(vocab_size=50257, n_positions=N_CTX, n_embd=32, n_layer=2, n_head=4)).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a weight loaded wrongly would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = workdir / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tasks(workdir, model_dir) -> Path:
    """The task files (JSON Lines and text) and lm-eval YAML configs for them, in one folder."""
    from gpt2kit.model import GPT2

    folder = workdir / "tasks"
    folder.mkdir()
    tok = Tokenizer.gpt2()
    model = GPT2.from_pretrained(model_dir)
    rows, hits = [], 0
    for i, context in enumerate(CONTEXTS):
        # Half the passages end in the model's own greedy word, so accuracy is not trivially 0.
        with torch.no_grad():
            logits, _ = model(torch.tensor([tok.encode(context)]))
            top = int(logits[0, -1].argmax())
        word = tok.decode([top])
        if i % 2 == 0 and re.fullmatch(r" [A-Za-z]+", word) and tok.encode(word) == [top]:
            rows.append({"text": context + word})
            hits += 1
        else:
            rows.append({"text": f"{context} {MISSES[i % len(MISSES)]}"})
    assert hits >= 2, "the task should have items the model gets right"
    write_jsonl(folder / "lambada.jsonl", rows)
    write_jsonl(folder / "mc.jsonl", [{"context": c, "choices": ch, "label": y} for c, ch, y in MC])
    for name, text in (("short", SHORT_TEXT), ("long", LONG_TEXT)):
        (folder / f"ppl_{name}.txt").write_text(text, encoding="utf-8")
        write_jsonl(folder / f"ppl_{name}.jsonl", [{"text": text}])
    assert len(tok.encode(SHORT_TEXT)) + 1 <= N_CTX - 2  # one window, even for the API backends
    assert len(tok.encode(LONG_TEXT)) > 3 * N_CTX  # several windows

    def dataset(file: str) -> str:
        return (
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            f"  data_files:\n    test: {folder / file}\n"
            f"  cache_dir: {workdir / 'datasets-cache'}\n"
            "test_split: test\n"
        )

    # lambada_openai's own prompt: the passage minus its last word; the target is " " + that word.
    (folder / "gk_lambada.yaml").write_text(
        "task: gk_lambada\n" + dataset("lambada.jsonl") + "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n"
        "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    (folder / "gk_mc.yaml").write_text(
        "task: gk_mc\n" + dataset("mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    for name in ("short", "long"):
        (folder / f"gk_ppl_{name}.yaml").write_text(
            f"task: gk_ppl_{name}\n" + dataset(f"ppl_{name}.jsonl") + "output_type: loglikelihood_rolling\n"
            'doc_to_text: ""\n'
            'doc_to_target: "{{text}}"\n'
            "metric_list:\n"
            "  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
            "  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
            "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n"
        )
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run_lm_eval(tasks: Path, names: list[str], *, model: str, model_args: str) -> dict[str, dict]:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=8,
        bootstrap_iters=0,
    )
    return {
        name: {k.removesuffix(",none"): v for k, v in res.items()} for name, res in out["results"].items()
    }


def gpt2kit_eval(model_dir: Path, tmp: Path, task: str, data: Path, *flags: str) -> dict:
    out = tmp / f"{data.stem}.json"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--task",
                task,
                "--data",
                str(data),
                "--output",
                str(out),
                *flags,
            ]
        )
    assert exit_info.value.code == 0
    return json.loads(out.read_text())["metrics"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(model_dir):
    """A real `gpt2kit serve` process on a loopback port."""
    port = free_port()
    cmd = [sys.executable, "-m", "gpt2kit", "serve", "--model", str(model_dir), "--model-name", SERVED]
    # Eager steps: this test is about the protocol, and a compiled step would take minutes to build.
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--threads", "1", "--no-compile", "--dtype", "float32"],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "gpt2kit serve did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def results(tasks, model_dir, server_url, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("gpt2kit-eval")
    names = ["gk_lambada", "gk_mc", "gk_ppl_short"]
    hf = run_lm_eval(
        tasks, [*names, "gk_ppl_long"], model="hf", model_args=f"pretrained={model_dir},dtype=float32"
    )
    # max_length = the model's context: the API backends keep the last position for the one
    # token they ask the server to generate with each scoring request.
    api_args = (
        f"model={SERVED},base_url={server_url}/v1/completions,tokenizer_backend=remote,"
        f"max_length={N_CTX},num_concurrent=1"
    )
    api = run_lm_eval(tasks, names, model="local-completions", model_args=api_args)
    ours = {
        "gk_lambada": gpt2kit_eval(model_dir, tmp, "lambada", tasks / "lambada.jsonl"),
        "gk_mc": gpt2kit_eval(model_dir, tmp, "multiple-choice", tasks / "mc.jsonl"),
        # --stride C: lm-eval's disjoint rolling windows of C tokens (the hf backend's windows)
        "gk_ppl_short": gpt2kit_eval(
            model_dir, tmp, "perplexity", tasks / "ppl_short.txt", "--stride", str(N_CTX)
        ),
        "gk_ppl_long": gpt2kit_eval(
            model_dir, tmp, "perplexity", tasks / "ppl_long.txt", "--stride", str(N_CTX)
        ),
    }
    return {"hf": hf, "api": api, "gpt2kit": ours}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_lambada_agrees(results) -> None:
    ours = results["gpt2kit"]["gk_lambada"]
    assert 0 < ours["acc"] < 1
    for backend in ("hf", "api"):
        theirs = results[backend]["gk_lambada"]
        assert theirs["acc"] == ours["acc"], backend
        assert theirs["perplexity"] == pytest.approx(ours["perplexity"], rel=1e-3), backend


def test_multiple_choice_agrees(results) -> None:
    ours = results["gpt2kit"]["gk_mc"]
    assert ours["acc"] != ours["acc_norm"]  # the per-character normalisation matters here
    for backend in ("hf", "api"):
        theirs = results[backend]["gk_mc"]
        assert (theirs["acc"], theirs["acc_norm"]) == (ours["acc"], ours["acc_norm"]), backend


def test_rolling_perplexity_agrees(results) -> None:
    ours = results["gpt2kit"]["gk_ppl_short"]
    for backend in ("hf", "api"):
        theirs = results[backend]["gk_ppl_short"]
        assert theirs["bits_per_byte"] == pytest.approx(ours["bits_per_byte"], rel=1e-3), backend
        assert theirs["byte_perplexity"] == pytest.approx(2 ** ours["bits_per_byte"], rel=1e-3), backend


def test_rolling_windows_agree_with_the_hf_backend(results) -> None:
    """A text of several windows: --stride C cuts it exactly as lm-eval's hf backend does."""
    ours = results["gpt2kit"]["gk_ppl_long"]
    assert ours["n_windows"] > 3
    theirs = results["hf"]["gk_ppl_long"]
    assert theirs["bits_per_byte"] == pytest.approx(ours["bits_per_byte"], rel=1e-3)
