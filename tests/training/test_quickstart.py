"""The quick start, shrunken: a small text, a small BPE, 20 steps; the real pipeline end to end."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from conftest import shakespeare_plays
from gpt2kit.errors import ConfigError
from gpt2kit.model import GPT2
from gpt2kit.model.checkpoint import load_tokenizer
from gpt2kit.training.metrics import read_metrics
from gpt2kit.training.quickstart import CPU_RECIPE, GPU_RECIPE, PROMPTS, quickstart, quickstart_config

# A tiny model, not compiled (compiling would take longer than the whole test).
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 48, "block_size": 64, "batch_size": 8, "threads": 1}
TINY |= {"lr": 3e-3, "compile": False}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four scenes' worth of one play, as 20 documents (so there is a val split)."""
    folder = tmp_path_factory.mktemp("corpus")
    text = shakespeare_plays()[0].read_text(encoding="utf-8")[:60000]
    for i in range(20):
        (folder / f"part{i:02d}.txt").write_text(text[i * 3000 : (i + 1) * 3000], encoding="utf-8")
    return folder


def test_quickstart_end_to_end(small_corpus: Path, tmp_path: Path) -> None:
    stages: list[str] = []
    events: list[dict] = []
    out = tmp_path / "qs"
    result = quickstart(
        out,
        max_steps=20,
        device="cpu",
        inputs=(str(small_corpus),),
        tokenizer="bpe:300",
        overrides=TINY,
        on_stage=stages.append,
        on_event=events.append,
    )
    assert [s.split(" ")[0] for s in stages if s[0].isdigit()] == [
        "1/4",
        "3/4",
        "4/4",
    ]  # --max-steps skips the timing stage
    assert result.steps == 20 and result.final_dir == out / "final"
    train_records, evals = read_metrics(out)
    assert train_records[-1]["step"] == 20 and evals[-1]["val_loss"] is not None
    # the model learned something: the val loss is well below uniform guessing over 300 tokens
    assert result.val_loss < math.log(300) - 0.5
    # bits per byte = nats/token * tokens / bytes / ln 2, with ~1-4 bytes per token here
    assert result.bits_per_byte is not None
    assert result.val_loss / math.log(2) / 4 < result.bits_per_byte < result.val_loss / math.log(2)
    assert set(result.samples) == set(PROMPTS)
    for prompt, text in result.samples.items():
        assert text.startswith(prompt) and len(text) > len(prompt)
    # the final model is a normal model directory with its own tokenizer
    assert (
        load_tokenizer(result.final_dir).n_vocab
        == GPT2.from_pretrained(result.final_dir).config.vocab_size
        == 300
    )
    assert any(e.get("kind") == "final" for e in events)

    # a second run into the same directory refuses and says how to continue
    with pytest.raises(ConfigError, match="--resume"):
        quickstart(out, max_steps=20, device="cpu", inputs=(str(small_corpus),), tokenizer="bpe:300")


def documented_recipes() -> dict[str, dict]:
    """The TOML blocks under docs/training.md's "The quick start's recipe" heading, by device."""
    doc = (Path(__file__).parents[2] / "docs" / "training.md").read_text(encoding="utf-8")
    section = doc.split("### The quick start's recipe", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n# (cpu|gpu)\n(.*?)```", section, flags=re.S)
    tomllib = pytest.importorskip("tomllib")
    return {device: tomllib.loads(body) for device, body in blocks}


def test_the_quickstart_trains_the_documented_recipe(tmp_path: Path) -> None:
    documented = documented_recipes()
    assert set(documented) == {"cpu", "gpu"}
    assert documented["cpu"] == CPU_RECIPE and documented["gpu"] == GPU_RECIPE
    for device, recipe in (("cpu", CPU_RECIPE), ("cuda", GPU_RECIPE)):
        cfg = quickstart_config(tmp_path, device=device, max_steps=1500, minutes=5.0)
        assert {key: getattr(cfg, key) for key in recipe} == recipe
        # the budget drives the schedule: the decay ends when the 5 minutes do
        assert cfg.max_minutes == 5.0 and cfg.warmup_steps == 75
    # examples/shakespeare.toml is the same recipe as a step-count run
    tomllib = pytest.importorskip("tomllib")
    example = tomllib.loads((Path(__file__).parents[2] / "examples" / "shakespeare.toml").read_text())
    assert {key: example[key] for key in CPU_RECIPE} == CPU_RECIPE
