"""setup_run: a fresh run, and a resumed one that stands exactly where its checkpoint left off."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt2kit.errors import CheckpointError, ConfigError
from gpt2kit.training.loop import train
from gpt2kit.training.parallel import Parallel
from gpt2kit.training.run import setup_run
from train_helpers import config, make_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_fresh_run(data_dir: Path, tmp_path: Path) -> None:
    cfg = config(data_dir, max_steps=3, grad_accum=2)
    run = setup_run(cfg, tmp_path / "run")
    try:
        assert type(run.parallel) is Parallel and run.device == torch.device("cpu")
        assert (run.step, run.best_val, run.best_step, run.last_checkpoint, run.saved_step) == (
            0,
            None,
            None,
            None,
            -1,
        )
        assert run.model is run.raw_model and run.eval_model is run.raw_model  # not compiled, not wrapped
        assert list(run.micros) == [0, 1] and run.tokens_per_step == 4 * 32 * 2
        assert run.amp is None  # dtype float32
        assert run.val_sampler is not None and run.tokenizer.n_vocab == 257
        assert run.optimizer.state_dict()["state"] == {}  # no step taken yet
        assert (tmp_path / "run" / "config.toml").read_text() == cfg.to_toml()
        assert run.metrics is not None and run.metrics.path == tmp_path / "run" / "metrics.jsonl"
    finally:
        run.close()


def test_resume_restores_where_the_run_stood(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = config(data_dir, max_steps=4, eval_interval=2, ckpt_interval=4, dropout=0.1)
    train(cfg, run_dir)
    ckpt = run_dir / "ckpt-000004"
    state = json.loads((ckpt / "trainer.json").read_text())
    saved = load_file(ckpt / "trainer.safetensors")

    run = setup_run(cfg.replace(max_steps=8), run_dir, resume=True)
    try:
        assert run.step == 4 and run.saved_step == 4 and run.last_checkpoint == ckpt
        assert (run.best_val, run.best_step) == (state["best_val_loss"], state["best_step"])
        assert run.best_val is not None and run.best_step in (2, 4)
        assert run.elapsed_before == state["elapsed_s"] > 0
        # the weights are the checkpoint's, the optimizer moments too
        weights = {
            k.removeprefix("transformer."): v for k, v in load_file(ckpt / "model.safetensors").items()
        }
        assert torch.equal(run.raw_model.wte.weight[:257], weights["wte.weight"][:257])
        assert torch.equal(run.raw_model.h[1].mlp.c_fc.weight, weights["h.1.mlp.c_fc.weight"].T)
        restored = run.optimizer.state_dict()["state"]
        for key, value in saved.items():
            if key.startswith("optim."):
                _, index, name = key.split(".")
                assert torch.equal(torch.as_tensor(restored[int(index)][name]), value), key
        # and every RNG is where it was when the checkpoint was written
        assert torch.equal(torch.get_rng_state(), saved["rng.torch"])
        assert list(random.getstate()[1]) == state["rng"]["python"][1]
        assert np.random.get_state()[1].tolist() == state["rng"]["numpy"][1]
    finally:
        run.close()
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(records[-1]) == {"kind": "resume", "step": 4}


def test_resume_needs_a_checkpoint_and_a_new_run_none(data_dir: Path, tmp_path: Path) -> None:
    cfg = config(data_dir, max_steps=2, eval_interval=2, ckpt_interval=2)
    with pytest.raises(CheckpointError, match="no usable checkpoint to resume from"):
        setup_run(cfg, tmp_path / "empty", resume=True)
    train(cfg, tmp_path / "run")
    with pytest.raises(
        ConfigError, match="already holds checkpoints; continue it with gpt2kit train --resume"
    ):
        setup_run(cfg, tmp_path / "run")


def test_grad_accum_must_split_over_the_processes(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checked before joining any process group, so three "processes" need no torchrun here.
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(
        ConfigError, match=r"grad_accum \(4\) must be a multiple of the number of processes \(3\)"
    ):
        setup_run(config(data_dir, grad_accum=4), tmp_path / "run")
    assert not (tmp_path / "run").exists()
