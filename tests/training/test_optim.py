"""Optimizers (gpt2kit/training/optim.py): the Muon/AdamW split, Muon's update against a reference written
out here, and the one state dict that checkpoints hold."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gpt2kit import GPT2, GPT2Config
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.optim import Optimizers, build_optimizer, muon_parameters

CPU = torch.device("cpu")
# Keller Jordan's quintic Newton-Schulz coefficients (torch.optim.Muon's defaults)
NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315


def tiny_model(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=16))


def random_grads(model: GPT2, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 0.01


def newton_schulz(m: torch.Tensor, steps: int) -> torch.Tensor:
    """Orthogonalise `m` (U S V^T -> about U V^T) by the quintic iteration, in bf16 as Muon does."""
    x = m.bfloat16()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        a = x @ x.T
        b = torch.addmm(a, a, a, beta=NS_B, alpha=NS_C)  # NS_B a + NS_C a^2
        x = torch.addmm(x, b, x, beta=NS_A)  # NS_A x + b x
    return x.T if tall else x


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest() -> None:
    model = tiny_model()
    names = muon_parameters(model)
    expected = {
        f"h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert names == expected
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in muon.param_groups[0]["params"]} == expected
    decay, no_decay = ({by_id[id(p)] for p in g["params"]} for g in adamw.param_groups)
    assert decay == {"wte.weight", "wpe.weight"}  # the output head is tied to wte
    assert no_decay == {n for n, p in model.named_parameters() if p.dim() == 1}
    # every parameter exactly once
    assert len(expected) + len(decay) + len(no_decay) == len(list(model.parameters()))
    # optimizer="adamw" keeps nanoGPT's single AdamW, matrices included
    (only,) = build_optimizer(model, TrainConfig(), CPU).optimizers
    assert isinstance(only, torch.optim.AdamW) and len(only.param_groups[0]["params"]) == 2 + 4 * 2


@pytest.mark.parametrize(
    ("settings", "adjust"),
    [
        ({"muon_nesterov": True, "muon_weight_decay": 0.0}, "original"),
        ({"muon_nesterov": False, "muon_weight_decay": 0.1, "muon_ns_steps": 3}, "original"),
        ({"muon_momentum": 0.9, "muon_adjust_lr_fn": "match_rms_adamw"}, "match_rms_adamw"),
    ],
)
def test_muon_update_equals_a_reference_step(settings: dict, adjust: str) -> None:
    cfg = TrainConfig(optimizer="muon", muon_lr=0.05, lr=1e-3, **settings)
    model = tiny_model()
    opt = build_optimizer(model, cfg, CPU)
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    buffers = {n: torch.zeros_like(p) for n, p in named.items()}
    scales = [1.0, 0.5, 0.25]  # the schedule's multiplier changes the lr of every group
    for step, scale in enumerate(scales):
        random_grads(model, seed=step)
        grads = {n: p.grad.clone() for n, p in named.items()}
        opt.set_lr_scale(scale)
        opt.step()
        lr = cfg.muon_lr * scale
        for name in muon_parameters(model):
            g, mu = grads[name], cfg.muon_momentum
            # momentum, an EMA of gradients: mu * buf + (1 - mu) * g (lerp: the same rounding as torch)
            buffers[name] = buffers[name].lerp(g, 1 - mu)
            # Nesterov: (1 - mu) * g + mu * buf
            update = g.lerp(buffers[name], mu) if cfg.muon_nesterov else buffers[name]
            rows, cols = g.shape
            factor = (
                math.sqrt(max(1.0, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))
            )
            ortho = newton_schulz(update, cfg.muon_ns_steps).float()
            expected = before[name] * (1 - lr * cfg.muon_weight_decay) - lr * factor * ortho
            torch.testing.assert_close(named[name].detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
            before[name] = expected
    # 5 steps: the update is orthogonal to bf16 precision (singular values near 1, not the gradient's)
    ortho = newton_schulz(torch.randn(96, 32), 5).float()
    s = torch.linalg.svdvals(ortho)
    assert s.min() > 0.5 and s.max() < 1.5


def test_adamw_part_of_muon_matches_plain_adamw() -> None:
    cfg = TrainConfig(optimizer="muon", lr=3e-3, weight_decay=0.1, beta2=0.99)
    model, reference = tiny_model(), tiny_model()
    opt = build_optimizer(model, cfg, CPU)
    muon_names = muon_parameters(model)
    rest = [(n, p) for n, p in reference.named_parameters() if n not in muon_names]
    plain = torch.optim.AdamW(
        [
            {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=3e-3,
        betas=(0.9, 0.99),
    )
    for step in range(3):
        random_grads(model, seed=step)
        random_grads(reference, seed=step)
        opt.step()
        plain.step()
    ours = dict(model.named_parameters())
    for name, p in rest:
        torch.testing.assert_close(ours[name], p, rtol=1e-6, atol=1e-8, msg=name)


def test_state_dict_is_one_optimizer_layout_and_round_trips() -> None:
    cfg = TrainConfig(optimizer="muon")
    model = tiny_model()
    opt = build_optimizer(model, cfg, CPU)
    for step in range(2):
        random_grads(model, seed=step)
        opt.step()
    state = copy.deepcopy(opt.state_dict())  # state_dict() shares the live moment tensors
    n = len(list(model.parameters()))
    assert sorted(state["state"]) == list(range(n))
    assert [i for g in state["param_groups"] for i in g["params"]] == list(range(n))
    assert set(state["state"][0]) == {"momentum_buffer"}  # Muon's parameters come first
    assert set(state["state"][n - 1]) == {"step", "exp_avg", "exp_avg_sq"}

    # A copy of the model with the loaded state takes the same next step.
    twin = tiny_model(seed=1)
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, cfg, CPU)
    twin_opt.load_state_dict(state)
    for o, m in ((opt, model), (twin_opt, twin)):
        random_grads(m, seed=9)
        o.set_lr_scale(0.5)
        o.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name

    # AdamW state does not load into a Muon run, nor the other way round.
    adamw = build_optimizer(tiny_model(), TrainConfig(), CPU)
    with pytest.raises(ValueError, match="3 parameter groups saved, 2 here"):
        adamw.load_state_dict(state)
    with pytest.raises(ValueError, match="2 parameter groups saved, 3 here"):
        opt.load_state_dict(adamw.state_dict())


def test_set_lr_scale_scales_every_group_from_its_own_peak() -> None:
    opt = build_optimizer(tiny_model(), TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.04), CPU)
    assert isinstance(opt, Optimizers)
    opt.set_lr_scale(0.25)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 2.5e-4, 2.5e-4])
