"""The optimizers of a training run: AdamW, or Muon for the blocks' matrices plus AdamW for the rest.

`optimizer = "adamw"` (nanoGPT's): AdamW on every parameter, weight decay on >= 2-D ones
(matrices, embeddings), none on biases and LayerNorms.

`optimizer = "muon"` (modded-nanogpt's split): `torch.optim.Muon` on the 2-D weights inside
the transformer blocks (`c_attn`, `c_proj`, `c_fc`: each step's momentum is orthogonalised by
Newton-Schulz iterations), AdamW as above on the embeddings (`wte`, tied to the output, and
`wpe`), the LayerNorms and the biases. Muon's hyper-parameters are the `muon_*` keys.

`Optimizers` steps them together and has one `state_dict()` in the layout of a single
torch optimizer (parameters numbered group by group, Muon's first), which is what the run
checkpoints store (checkpoint.py) and parallel.py gathers and scatters for FSDP.

>>> opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))  # doctest: +SKIP
>>> opt.set_lr_scale(0.5)  # every group at half its peak lr  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gpt2kit.training.config import TrainConfig

# The blocks' projection weights: the matrices Muon orthogonalises (nn.Linear, [out, in]).
MUON_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class Optimizers:
    """Torch optimizers stepped as one, with one state dict and a per-group peak lr.

    `param_groups` lists every optimizer's groups in order (the live dicts: setting
    `group["lr"]` changes the optimizer); `peak_lrs[i]` is group i's lr at scale 1.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], peak_lrs: list[float]) -> None:
        self.optimizers = optimizers
        self.peak_lrs = peak_lrs
        assert len(peak_lrs) == len(self.param_groups), "one peak lr per parameter group"

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # Not cached: load_state_dict replaces the optimizers' group dicts.
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_scale(self, scale: float) -> None:
        for group, peak in zip(self.param_groups, self.peak_lrs, strict=True):
            group["lr"] = peak * scale

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """One optimizer's layout: parameters numbered 0.. across all groups of all optimizers."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what `state_dict` returned (ValueError when it is another optimizer's or model's)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{len(groups)} parameter groups saved, {len(self.param_groups)} here")
        for saved, group in zip(groups, self.param_groups, strict=True):
            if ("betas" in saved) != ("betas" in group):  # AdamW's groups have betas, Muon's don't
                kinds = ["AdamW" if "betas" in g else "Muon" for g in (saved, group)]
                raise ValueError(f"{kinds[0]} state saved for {kinds[1]} parameters")
        offset, first = 0, 0
        for opt in self.optimizers:
            mine = groups[first : first + len(opt.param_groups)]
            count = sum(len(g["params"]) for g in opt.param_groups)
            opt.load_state_dict(
                {
                    "state": {
                        i - offset: s for i, s in state_dict["state"].items() if offset <= i < offset + count
                    },
                    "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine],
                }
            )
            offset += count
            first += len(opt.param_groups)


def muon_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters Muon trains: the 2-D projection weights inside the blocks."""
    return {
        name
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and name.startswith("h.") and name.endswith(MUON_WEIGHTS)
    }


def adamw_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices and embeddings (>= 2-D) decay; biases and LayerNorms don't."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """The run's optimizers for `model`'s trainable parameters (call after sharding, under FSDP)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    on_muon = muon_parameters(model) if cfg.optimizer == "muon" else set()
    optimizers: list[torch.optim.Optimizer] = []
    peaks: list[float] = []
    if on_muon:
        muon = torch.optim.Muon(
            [p for n, p in named if n in on_muon],
            lr=cfg.muon_lr,
            weight_decay=cfg.muon_weight_decay,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            ns_steps=cfg.muon_ns_steps,
            adjust_lr_fn=cfg.muon_adjust_lr_fn,
        )
        optimizers.append(muon)
        peaks.append(cfg.muon_lr)
    rest = [p for n, p in named if n not in on_muon]
    # Fused AdamW updates all parameters in a few kernels; PyTorch has it on CUDA and CPU.
    fused = device.type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(
        adamw_groups(rest, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused
    )
    optimizers.append(adamw)
    peaks += [cfg.lr, cfg.lr]
    return Optimizers(optimizers, peaks)
