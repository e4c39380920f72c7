"""FSDP training (`parallel = "fsdp"`) with two gloo processes on CPU, against one process.

The same tiny model and byte-level data as tests/training/test_train.py. One FSDP run (module
fixture) serves the comparisons with a single-process run, the checks of its final model
and checkpoints, and the resume test. `grad_accum=4` gives each rank two micro-steps (the
first without gradient sync), and `eval_iters=3` does not divide among two ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt2kit.model import GPT2
from gpt2kit.training.checkpoint import checkpoint_dirs, latest_checkpoint
from gpt2kit.training.loop import train
from gpt2kit.training.metrics import read_metrics
from train_helpers import config, make_data, tiny_args

SETTINGS = {
    "max_steps": 6,
    "log_interval": 1,
    "eval_interval": 3,
    "eval_iters": 3,
    "ckpt_interval": 3,
    "keep_last": 5,
    "grad_accum": 4,
}


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node 2 -m gpt2kit ARGS` on CPU (gloo), one thread each."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
            *("-m", "gpt2kit", *args),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def fsdp_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    proc = torchrun(*tiny_args(data_dir, run, parallel="fsdp", **SETTINGS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP: weights, gradients and AdamW state sharded over 2 processes" in proc.stderr
    return run


def test_fsdp_two_processes_match_one_process(data_dir: Path, fsdp_run: Path, tmp_path: Path) -> None:
    # One process with parallel="fsdp" has nothing to shard and trains as a plain run.
    one_run = tmp_path / "one"
    train(config(data_dir, parallel="fsdp", **SETTINGS), one_run)
    one, one_evals = read_metrics(one_run)
    two, two_evals = read_metrics(fsdp_run)
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm"):  # grad_norm: the global norm over both ranks' shards
        np.testing.assert_allclose(
            [r[key] for r in two], [r[key] for r in one], rtol=1e-5, atol=0, err_msg=key
        )
    assert [e["step"] for e in two_evals] == [3, 6]
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(
            [e[key] for e in two_evals], [e[key] for e in one_evals], rtol=1e-5, atol=0, err_msg=key
        )
    a, b = GPT2.from_pretrained(one_run / "final"), GPT2.from_pretrained(fsdp_run / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)

    # The checkpoints are the single-process format: same files, tensor names, optimizer layout.
    assert [p.name for p in checkpoint_dirs(fsdp_run)] == ["ckpt-000006", "ckpt-000003"]
    for name in ("ckpt-000003", "ckpt-000006"):
        ours, theirs = one_run / name, fsdp_run / name
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
        t1, t2 = load_file(ours / "trainer.safetensors"), load_file(theirs / "trainer.safetensors")
        assert t1.keys() == t2.keys()
        for key in (k for k in t1 if k.startswith("optim.")):
            torch.testing.assert_close(t2[key], t1[key], atol=1e-6, rtol=1e-4, msg=key)
        s1, s2 = (json.loads((d / "trainer.json").read_text()) for d in (ours, theirs))
        assert s1["optimizer"] == s2["optimizer"] and s2["world_size"] == 2


def test_fsdp_final_model_loads(fsdp_run: Path) -> None:
    model = GPT2.from_pretrained(fsdp_run / "final")
    assert model.config.n_layer == 2 and model.num_parameters() == 36_736
    assert (fsdp_run / "final" / "vocab.json").is_file()
    with torch.no_grad():
        logits = model(torch.tensor([[72, 101, 108, 108, 111]])).logits
    assert logits.shape == (1, 5, 257) and torch.isfinite(logits).all()
    # the last checkpoint holds the same weights as the final model
    final = load_file(fsdp_run / "final" / "model.safetensors")
    last = load_file(fsdp_run / "ckpt-000006" / "model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def resume_from_step_3(run: Path, tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of `run` as it was just after its step-3 checkpoint (what came later dropped),
    resumed to the end under torchrun."""
    part = tmp_path / "part"
    shutil.copytree(run, part)
    shutil.rmtree(part / "ckpt-000006")
    shutil.rmtree(part / "final")
    proc = torchrun("train", "--resume", str(part), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return part, proc


def test_fsdp_resume_is_bit_identical(fsdp_run: Path, tmp_path: Path) -> None:
    part, proc = resume_from_step_3(fsdp_run, tmp_path)
    assert f"resuming from {part / 'ckpt-000003'} (step 3)" in proc.stderr
    full = (fsdp_run / "final" / "model.safetensors").read_bytes()
    assert (part / "final" / "model.safetensors").read_bytes() == full
    ref, _ = read_metrics(fsdp_run)
    got, _ = read_metrics(part)
    assert [(r["step"], r["loss"]) for r in got] == [(r["step"], r["loss"]) for r in ref]


# One Newton-Schulz iteration: Muon's bf16 iterations amplify a last-bit difference of a summed
# gradient (5 iterations: 1e-7 relative becomes 1e-3 in the weights within 5 steps; 1: 2e-6), and
# what is tested (DTensor products over the whole sharded matrix) is the same for any count.
MUON = {"optimizer": "muon", "muon_ns_steps": 1}


@pytest.fixture(scope="module")
def fsdp_muon_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fsdp-muon") / "run"
    proc = torchrun(*tiny_args(data_dir, run, parallel="fsdp", **MUON, **SETTINGS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP: weights, gradients and Muon and AdamW state sharded over 2 processes" in proc.stderr
    return run


def test_fsdp_muon_matches_one_process(data_dir: Path, fsdp_muon_run: Path, tmp_path: Path) -> None:
    """torch.optim.Muon steps the sharded (DTensor) matrices: its Newton-Schulz products run on
    DTensors, which gather what each product needs, so the update is the whole matrix's."""
    one_run = tmp_path / "one"
    train(config(data_dir, **MUON, **SETTINGS), one_run)
    one, _ = read_metrics(one_run)
    two, _ = read_metrics(fsdp_muon_run)
    # Muon rounds its update to bf16: a last-bit difference can move an entry by one bf16 step.
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=0, atol=1e-4)
    a, b = GPT2.from_pretrained(one_run / "final"), GPT2.from_pretrained(fsdp_muon_run / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    # the checkpoint holds Muon's momentum and AdamW's moments, in the single-process layout
    t1 = load_file(one_run / "ckpt-000006" / "trainer.safetensors")
    t2 = load_file(fsdp_muon_run / "ckpt-000006" / "trainer.safetensors")
    assert t1.keys() == t2.keys() and "optim.0.momentum_buffer" in t2
    s1, s2 = (json.loads((d / "ckpt-000006" / "trainer.json").read_text()) for d in (one_run, fsdp_muon_run))
    assert s1["optimizer"] == s2["optimizer"]


def test_fsdp_muon_resume_is_bit_identical(fsdp_muon_run: Path, tmp_path: Path) -> None:
    part, _ = resume_from_step_3(fsdp_muon_run, tmp_path)
    full = (fsdp_muon_run / "final" / "model.safetensors").read_bytes()
    assert (part / "final" / "model.safetensors").read_bytes() == full


def test_fsdp_nonfinite_loss_stops_every_rank(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = {"max_steps": 4, "lr": 1e30, "warmup_steps": 0, "grad_clip": 0.0, "ckpt_interval": 1}
    proc = torchrun(*tiny_args(data_dir, run, parallel="fsdp", grad_accum=2, **settings))
    assert proc.returncode != 0
    last = latest_checkpoint(run)
    assert last is not None and not (run / "final").exists()
    # both ranks stop at the same step and name the checkpoint rank 0 wrote
    assert proc.stderr.count(f"the last good checkpoint is {last.path}: resume with") == 2, proc.stderr[
        -3000:
    ]
    assert proc.stderr.count(f"at step {last.step};") == 2


def test_fsdp_bf16_computes_in_bf16_and_keeps_float32_state(
    data_dir: Path, fsdp_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = torchrun(*tiny_args(data_dir, run, parallel="fsdp", dtype="bfloat16", **SETTINGS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(bf16 compute, float32 reduction)" in proc.stderr
    bf16 = [r["loss"] for r in read_metrics(run)[0]]
    fp32 = [r["loss"] for r in read_metrics(fsdp_run)[0]]
    np.testing.assert_allclose(bf16, fp32, rtol=1e-3, atol=0)
    assert bf16 != fp32  # the forward really ran in bf16
    # the sharded master weights and AdamW moments stay float32
    assert {t.dtype for t in load_file(run / "final" / "model.safetensors").values()} == {torch.float32}
    trainer = load_file(run / "ckpt-000006" / "trainer.safetensors")
    assert {t.dtype for k, t in trainer.items() if k.startswith("optim.")} == {torch.float32}
