"""Training: config, schedule, batches, overfitting, checkpoints, exact resume, DDP, HF loading.

Data directories are written with gpt2kit.data.shards's real writers (the format `gpt2kit prepare`
produces) over a byte-level tokenizer (257 tokens), so models stay tiny. Subprocess runs use
one torch thread: the CPU is shared and results must not depend on the thread count.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt2kit.data.batches import BlockSampler, micro_steps
from gpt2kit.data.shards import TokenData
from gpt2kit.device import cpu_bf16
from gpt2kit.errors import ConfigError
from gpt2kit.tokenizer.tokenizer import Tokenizer
from gpt2kit.training.checkpoint import checkpoint_dirs, latest_checkpoint
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.loop import NonFiniteLossError, resume_config, train
from gpt2kit.training.metrics import read_metrics
from gpt2kit.training.optim import adamw_groups
from gpt2kit.training.run import autocast_dtype
from pause_helpers import kill_paused, pause_env, wait_paused
from train_helpers import config, make_data, tiny_args


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- schedule, optimizer groups, batches ---------------------------------------------------------


def test_weight_decay_only_on_matrices(data_dir: Path) -> None:
    from gpt2kit import GPT2, GPT2Config

    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32))
    decay, no_decay = adamw_groups(list(model.parameters()), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # wte (tied with the output), wpe and the 4 projections of each of 2 blocks
    assert len(decay["params"]) == 2 + 4 * 2


def test_blocks_are_a_pure_function_of_step(data_dir: Path) -> None:
    data = TokenData.open(data_dir)
    a = BlockSampler(data, "train", block_size=16, seed=3)
    b = BlockSampler(data, "train", block_size=16, seed=3)
    x1, y1 = a.batch(step=5, micro=1, batch_size=4)
    a.batch(step=6, micro=0, batch_size=4)  # drawing others changes nothing
    x2, y2 = b.batch(step=5, micro=1, batch_size=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(x1, a.batch(step=5, micro=0, batch_size=4)[0])
    tokens = torch.from_numpy(data.tokens("train").astype(np.int64))
    for offset, row in zip(a.offsets(step=5, micro=1, batch_size=4), x1, strict=True):
        assert torch.equal(tokens[offset : offset + 16], row)
    # Two ranks together run exactly the micro-batches one process runs.
    ranks = [list(micro_steps(4, rank=r, world_size=2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(micro_steps(4, rank=0, world_size=1))


def test_too_little_data_names_block_size(tmp_path: Path) -> None:
    data = make_data(tmp_path / "d", "tiny text")
    with pytest.raises(Exception, match="fewer than block_size"):
        train(config(data, max_steps=1), tmp_path / "run")


# --- training ----------------------------------------------------------------------------------


def test_tiny_model_overfits_a_small_batch(tmp_path: Path) -> None:
    # 40 tokens and block_size 32: only 8 distinct blocks, which the model learns by heart.
    data = make_data(tmp_path / "d", "To be, or not to be: that is the question", val=False)
    cfg = config(data, max_steps=150, lr=1e-2, min_lr=1e-3, eval_interval=150, log_interval=1)
    cfg = cfg.replace(ckpt_interval=1000, weight_decay=0.0)
    result = train(cfg, tmp_path / "run")
    assert result.train_loss is not None and result.train_loss < 0.1
    train_records, evals = read_metrics(tmp_path / "run")
    assert train_records[0]["loss"] > 4.0 and evals[-1]["train_loss"] < 0.1
    assert evals[-1]["val_loss"] is None  # no val split: reported as such, not invented


def test_run_directory_and_hf_compatible_checkpoints(data_dir: Path, tmp_path: Path) -> None:
    import transformers

    from gpt2kit.model import GPT2

    run = tmp_path / "run"
    cfg = config(data_dir, max_steps=6, eval_interval=3, ckpt_interval=2, log_interval=2, keep_last=1)
    result = train(cfg, run)
    assert result.final_dir == run / "final" and result.step == 6
    # keep_last=1 plus the best by val loss (the last here, since val loss falls)
    assert [p.name for p in checkpoint_dirs(run)] == ["ckpt-000006"]
    assert (run / "latest").read_text().strip() == "ckpt-000006"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in train_records)
    assert [r["step"] for r in records if r.get("kind") == "eval"] == [3, 6]
    assert TrainConfig.load(run / "config.toml") == cfg

    ids = torch.randint(0, 257, (2, 20))
    ours = GPT2.from_pretrained(run / "final")
    hf = transformers.GPT2LMHeadModel.from_pretrained(run / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)
    # a training checkpoint is the same model directory
    hf_ckpt = transformers.GPT2LMHeadModel.from_pretrained(run / "ckpt-000006").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_ckpt(ids).logits, hf(ids).logits, atol=0, rtol=0)
    assert Tokenizer.from_dir(run / "final").n_vocab == 257


def test_existing_run_needs_resume(data_dir: Path, tmp_path: Path) -> None:
    train(config(data_dir, max_steps=2, eval_interval=2, ckpt_interval=2), tmp_path / "run")
    with pytest.raises(ConfigError, match="--resume"):
        train(config(data_dir, max_steps=2), tmp_path / "run")


def test_resume_from_a_checkpoint_is_exact_and_can_extend(data_dir: Path, tmp_path: Path) -> None:
    import shutil

    cfg = config(data_dir, max_steps=8, eval_interval=4, ckpt_interval=4, keep_last=5, dropout=0.1)
    train(cfg, tmp_path / "full")
    # The state of the same run just after its step-4 checkpoint: drop what came later.
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "ckpt-000008")
    shutil.rmtree(tmp_path / "part" / "final")
    result = train(cfg, tmp_path / "part", resume=True)
    assert result.step == 8
    full = (tmp_path / "full" / "final" / "model.safetensors").read_bytes()
    assert (tmp_path / "part" / "final" / "model.safetensors").read_bytes() == full
    # A finished run continues with a larger max_steps.
    longer = train(cfg.replace(max_steps=10), tmp_path / "full", resume=True)
    assert longer.step == 10 and latest_checkpoint(tmp_path / "full").step == 10


def test_nonfinite_loss_stops_or_skips(data_dir: Path, tmp_path: Path) -> None:
    cfg = config(data_dir, max_steps=6, lr=1e30, warmup_steps=0, grad_clip=0.0, ckpt_interval=1)
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, tmp_path / "stop")
    message = str(e.value)
    assert "at step" in message and "last good checkpoint is" in message and "--resume" in message
    last = latest_checkpoint(tmp_path / "stop")
    assert last is not None and str(last.path) in message
    result = train(cfg.replace(skip_nonfinite=True), tmp_path / "skip")
    assert result.step == 6 and result.final_dir is not None


def test_resume_refuses_another_optimizer(data_dir: Path, tmp_path: Path) -> None:
    cfg = config(data_dir, max_steps=2, eval_interval=2, ckpt_interval=2)
    train(cfg, tmp_path / "run")
    with pytest.raises(ConfigError) as e:
        train(cfg.replace(optimizer="muon", max_steps=4), tmp_path / "run", resume=True)
    assert "holds adamw optimizer state, but optimizer is 'muon'" in str(e.value)
    assert "--set optimizer=adamw" in str(e.value) and "--set init_from=" in str(e.value)


def test_dtype_auto_is_bf16_where_the_cpu_has_it(data_dir: Path, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    # the one decision gpt2kit.device makes for every command (AVX512-BF16, AMX, Arm BF16)
    assert autocast_dtype(TrainConfig(dtype="auto"), cpu) == (torch.bfloat16 if cpu_bf16() else None)
    assert autocast_dtype(TrainConfig(dtype="float32"), cpu) is None
    assert autocast_dtype(TrainConfig(dtype="bfloat16"), cpu) == torch.bfloat16
    # bf16 autocast trains (on any CPU; fast where native): close to float32, not equal
    settings = {"max_steps": 4, "log_interval": 1, "eval_interval": 4, "ckpt_interval": 4}
    train(config(data_dir, **settings), tmp_path / "fp32")
    train(config(data_dir, dtype="bfloat16", **settings), tmp_path / "bf16")
    fp32 = [r["loss"] for r in read_metrics(tmp_path / "fp32")[0]]
    bf16 = [r["loss"] for r in read_metrics(tmp_path / "bf16")[0]]
    np.testing.assert_allclose(bf16, fp32, rtol=2e-2)
    assert bf16 != fp32
    # weights and optimizer state stay float32
    weights = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


# --- crash safety ------------------------------------------------------------------------------


def test_truncated_checkpoint_falls_back_to_previous(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    cfg = config(data_dir, max_steps=4, eval_interval=2, ckpt_interval=2, keep_last=5)
    train(cfg, run)
    newest = run / "ckpt-000004" / "model.safetensors"
    with open(newest, "r+b") as f:  # a crash mid-write (or a bad disk) leaves a short file
        f.truncate(newest.stat().st_size // 2)
    # and a crash while assembling the next one leaves a temporary directory behind
    (run / ".ckpt-000006.tmp").mkdir()
    with caplog.at_level(logging.WARNING, logger="gpt2kit.training.checkpoint"):
        ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.step == 2
    assert "ckpt-000004 is damaged" in caplog.text and "model.safetensors has" in caplog.text
    # A flipped byte with the right size is caught by the checksum.
    trainer = run / "ckpt-000002" / "trainer.safetensors"
    blob = bytearray(trainer.read_bytes())
    blob[-1] ^= 0xFF
    trainer.write_bytes(bytes(blob))
    assert latest_checkpoint(run) is None
    with pytest.raises(Exception, match="no usable checkpoint"):
        train(cfg, run, resume=True)


@pytest.mark.parametrize(
    ("recipe", "moment", "resumed_from"),
    [
        ({"optimizer": "adamw"}, "train.mid_step:11", 9),
        ({"optimizer": "muon", "schedule": "wsd", "muon_weight_decay": 0.1}, "train.mid_eval:2", 9),
    ],
    ids=["adamw", "muon"],
)
def test_resume_after_sigkill_is_bit_identical(
    data_dir: Path, tmp_path: Path, recipe: dict, moment: str, resumed_from: int
) -> None:
    """Kill -9 a training process after its first checkpoints (AdamW mid-way through step 11,
    Muon mid-way through the evaluation at step 12), resume it, and compare the final weights
    with an uninterrupted run, byte for byte. The process pauses at the moment (gpt2kit.faults)
    and is killed there, so the kill can't miss it on a fast machine."""
    settings = {"max_steps": 24, "ckpt_interval": 3, "eval_interval": 6, "log_interval": 1, "dropout": 0.1}
    settings |= recipe
    train(config(data_dir, **settings), tmp_path / "ref")  # uninterrupted, in this process

    run, marker = tmp_path / "killed", tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2kit", *tiny_args(data_dir, run, **settings)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=pause_env(marker, moment, OMP_NUM_THREADS="1"),
    )
    assert kill_paused(proc, marker) == moment
    assert not (run / "final").exists()
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.step == resumed_from  # the steps after it are trained again

    train(resume_config(run), run, resume=True)  # what `gpt2kit train --resume RUN` runs
    ref_bytes = (tmp_path / "ref" / "final" / "model.safetensors").read_bytes()
    assert (run / "final" / "model.safetensors").read_bytes() == ref_bytes
    # The metrics read back as one run: every step once, the same losses as the reference.
    ref_train, _ = read_metrics(tmp_path / "ref")
    got_train, _ = read_metrics(run)
    assert [r["step"] for r in got_train] == list(range(1, 25))
    assert [r["loss"] for r in got_train] == [r["loss"] for r in ref_train]


def test_ctrl_c_saves_a_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C mid-way through step 12 (the process paused there: gpt2kit.faults): the step ends,
    a checkpoint of step 12 is written, and the run exits 130 saying how to resume."""
    run, marker = tmp_path / "run", tmp_path / "paused"
    args = tiny_args(data_dir, run, max_steps=100000, ckpt_interval=100000, eval_interval=100000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2kit", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=pause_env(marker, "train.mid_step:12", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
    )
    wait_paused(proc, marker)
    proc.send_signal(signal.SIGINT)
    # The paused process runs the handler, which says so; only then is it let go on.
    assert proc.stderr is not None
    said = []
    while not (said and "interrupt: saving a checkpoint" in said[-1]):
        said.append(proc.stderr.readline())
        assert said[-1], f"the run ended without noticing the interrupt: {''.join(said)}"
    marker.unlink()
    _, err = proc.communicate(timeout=60)
    err = "".join(said) + err
    assert proc.returncode == 130, err
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.step == 12
    assert f"gpt2kit train --resume {run}" in err


# --- many processes ----------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_gloo_processes_match_one_process(data_dir: Path, tmp_path: Path, optimizer: str) -> None:
    settings = {"max_steps": 5, "log_interval": 1, "eval_interval": 5, "ckpt_interval": 5, "grad_accum": 4}
    if optimizer == "muon":
        # One Newton-Schulz iteration: Muon's bf16 iterations amplify a last-bit difference of
        # the summed gradient (5 iterations turn a 1e-7 relative change into 1e-3 in the weights
        # after 5 steps; 1 iteration: 2e-6), and what is tested (the gradient averaged over the
        # ranks before Muon sees it) is the same for any count.
        settings |= {"optimizer": "muon", "muon_ns_steps": 1}
    train(config(data_dir, **settings), tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
            *("-m", "gpt2kit", *tiny_args(data_dir, tmp_path / "two", **settings)),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, _ = read_metrics(tmp_path / "one")
    two, _ = read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    # Muon rounds its update to bf16: a last-bit difference can move an entry by one bf16 step.
    atol = 1e-5 if optimizer == "adamw" else 1e-4
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=0, atol=atol)
    # and the weights agree to float tolerance
    from gpt2kit.model import GPT2

    a, b = GPT2.from_pretrained(tmp_path / "one" / "final"), GPT2.from_pretrained(tmp_path / "two" / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


# --- plot --------------------------------------------------------------------------------------


def test_plot_writes_a_png(data_dir: Path, tmp_path: Path) -> None:
    from gpt2kit.training.plot import plot_run

    train(config(data_dir, max_steps=4, eval_interval=2, ckpt_interval=4, log_interval=1), tmp_path / "run")
    path = plot_run(tmp_path / "run")
    assert path == tmp_path / "run" / "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.parametrize(
    ("device", "fragment"),
    [
        ("foo", "device must be one of auto, cpu, cuda, mps, got 'foo'"),
        ("cuda:x", "--set device=cuda:x: unknown device"),
        ("mps", "--set device=mps: MPS is not available"),
    ],
)
def test_cli_train_refuses_a_device_it_cannot_use(
    data_dir: Path, tmp_path: Path, device: str, fragment: str
) -> None:
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    res = subprocess.run(
        [sys.executable, "-m", "gpt2kit", *tiny_args(data_dir, tmp_path / "run", device=device)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]  # after the resolved config, which train prints first
    assert last.startswith("gpt2kit train: error:") and fragment in last and "cpu" in last, res.stderr
    assert "Traceback" not in res.stderr


def test_quickstart_refuses_an_unknown_device_before_any_work(tmp_path: Path) -> None:
    from gpt2kit.training.quickstart import quickstart

    with pytest.raises(ConfigError, match="--device foo: unknown device"):
        quickstart(out=tmp_path / "qs", device="foo")
    assert not (tmp_path / "qs" / "data").exists()
