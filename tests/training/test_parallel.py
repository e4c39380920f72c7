"""The single-process `Parallel` strategy, and the arithmetic DDP and FSDP add to it.

Under torchrun the strategies are exercised end to end by tests/training/test_train.py (DDP)
and tests/training/test_train_fsdp.py (FSDP); here one process checks what the loop relies on
without a process group: one process trains the model as it is, and every collective is the
identity.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.training.checkpoint import latest_checkpoint, save_checkpoint
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.optim import build_optimizer
from gpt2kit.training.parallel import DDP, FSDP, Parallel, start_parallel

CPU = torch.device("cpu")


@pytest.fixture
def model() -> GPT2:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=16)
    return GPT2(config.replace(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def backward(model: GPT2, seed: int = 0) -> None:
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(x, x).loss.backward()


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_one_process_is_the_plain_strategy(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parallel = start_parallel(kind, CPU)
    assert type(parallel) is Parallel  # one process: fsdp has nothing to shard
    assert (parallel.rank, parallel.world_size, parallel.main) == (0, 1, True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert type(start_parallel(kind, CPU)) is Parallel


def test_the_model_trains_as_it_is(model: GPT2) -> None:
    parallel = Parallel(CPU)
    weights = [p.detach().clone() for p in model.parameters()]
    assert parallel.shard(model, amp=torch.bfloat16, optimizer="adamw") == torch.bfloat16
    assert parallel.shard(model, amp=None, optimizer="muon") is None
    assert parallel.wrap(model) is model
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())  # no DTensors
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    # no_sync changes nothing: gradients of two backward passes inside it add up
    backward(model, 0)
    once = [p.grad.clone() for p in model.parameters()]
    with parallel.no_sync():
        backward(model, 0)
    for p, g in zip(model.parameters(), once, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)  # tied wte: its two parts add in another order


def test_clip_grad_norm_is_the_global_norm(model: GPT2) -> None:
    backward(model)
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    grads = [p.grad.clone() for p in model.parameters()]
    norm = Parallel(CPU).clip_grad_norm(model, 0.5 * expected.item())
    torch.testing.assert_close(norm, expected)
    for p, g in zip(model.parameters(), grads, strict=True):  # clipped to half: scaled by 1/2
        torch.testing.assert_close(p.grad, g * 0.5, rtol=1e-5, atol=1e-7)


def test_collectives_are_the_identity_for_one_process() -> None:
    parallel = Parallel(CPU)
    t = torch.tensor(3.0)
    parallel.mean(t)
    parallel.sum(t)
    assert t.item() == 3.0
    assert parallel.max_over_ranks([1.0, 2.5]) == [1.0, 2.5]
    parallel.barrier()
    parallel.close()
    assert list(parallel.eval_batches(5)) == [0, 1, 2, 3, 4]


def test_evaluation_batches_split_over_ranks() -> None:
    # DDP: rank r scores r, r + N, ...; every batch once over the ranks.
    ddp = [list(DDP(CPU, rank=r, world_size=2).eval_batches(3)) for r in range(2)]
    assert ddp == [[0, 2], [1]]
    # FSDP: each forward is a collective, so both ranks run two; index 3 is a repeat not counted.
    fsdp = [list(FSDP(CPU, rank=r, world_size=2).eval_batches(3)) for r in range(2)]
    assert fsdp == [[0, 2], [1, 3]]
    assert list(FSDP(CPU, rank=2, world_size=4).eval_batches(8)) == [2, 6]


def test_checkpoint_state_and_optimizer_restore(model: GPT2, tmp_path: Path) -> None:
    parallel = Parallel(CPU)
    cfg = TrainConfig(optimizer="muon")
    optimizer = build_optimizer(model, cfg, CPU)
    for seed in range(2):
        backward(model, seed)
        optimizer.step()
        optimizer.zero_grad()
    assert parallel.full_model(model) is model
    assert parallel.full_optimizer_state(model, optimizer) is optimizer
    save_checkpoint(tmp_path, step=2, model=model, tokenizer=None, optimizer=optimizer, state={}, keep_last=1)
    fresh = build_optimizer(model, cfg, CPU)
    parallel.restore_optimizer(model, fresh, latest_checkpoint(tmp_path))
    saved, restored = optimizer.state_dict(), fresh.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    assert saved["state"].keys() == restored["state"].keys() and saved["state"]
    for i, slots in saved["state"].items():
        for name, value in slots.items():
            torch.testing.assert_close(restored["state"][i][name], value, rtol=0, atol=0)


def test_fsdp_modules_load_only_for_fsdp_runs() -> None:
    # They take about as long to import as torch: every gpt2kit command would pay for them.
    code = (
        "import sys, gpt2kit, gpt2kit.training.loop; "
        "print([m for m in sys.modules if m.startswith(('torch.distributed.fsdp', 'torch.distributed.checkpoint'))])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
