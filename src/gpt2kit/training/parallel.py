"""FSDP2 training: shard a GPT2 over the processes, and gather or load its full state.

With `parallel = "fsdp"` under torchrun, `shard` applies `torch.distributed.fsdp.fully_shard`
to every Block and then to the model (wte, wpe, ln_f): each parameter becomes a DTensor
holding 1/N of its rows on each of the N processes, and so do its gradient and its AdamW
moments. A Block's full weights exist only while it runs (all-gathered before its forward
and backward, freed after); gradients are reduce-scattered, so each process keeps only the
gradient of its own shard.

Checkpoints keep the single-process format (runcheckpoint.py). `full_model` and
`full_optimizer_state` gather the unsharded state onto rank 0's CPU, and
`restore_optimizer` hands each rank its slice of a saved state. Both translate between the
parameter-name keys of torch.distributed.checkpoint and the index keys of
`optimizer.state_dict()` that `trainer.safetensors` holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from gpt2kit.errors import CheckpointError
from gpt2kit.model.gpt2 import GPT2, sinusoidal_table
from gpt2kit.training.checkpoint import RunCheckpoint, optimizer_state
from gpt2kit.training.optim import Optimizers

# Gathered state goes to rank 0's CPU only: a full copy on every GPU is what FSDP avoids.
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: GPT2, device: torch.device, *, param_dtype: torch.dtype | None = None) -> None:
    """Shard `model` in place over all processes: one FSDP unit per Block, then the root.

    With `param_dtype=torch.bfloat16` the all-gathered weights (and so the forward and
    backward) are bf16, while the sharded weights, the AdamW state and the gradient
    reduction stay float32; this replaces autocast.
    """
    # The mesh is explicit: FSDP's default is a CUDA mesh whenever CUDA exists, even for device=cpu.
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
    )
    for block in model.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2's counterpart of DDP's `no_sync()`: backward passes inside only accumulate.

    FSDP2 reads the flag in backward (DDP reads it in forward), so the backward pass must
    run inside the block. The next backward outside reduce-scatters the accumulated sum.
    """
    assert isinstance(model, FSDPModule), "no_sync needs a model that went through shard()"
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_model(model: GPT2) -> GPT2 | None:
    """An unsharded CPU copy of `model` on rank 0 (None on the others), e.g. for save_model.

    A collective: every rank must call it at the same point of the run.
    """
    weights = get_model_state_dict(model, options=GATHER)
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = GPT2(model.config)
    plain.load_state_dict(weights, assign=True)
    if model.config.position_embedding == "sinusoidal":  # a non-persistent buffer, still on meta
        plain.wpe_table = sinusoidal_table(model.config.n_positions, model.config.n_embd)
    return plain.eval()


def full_optimizer_state(model: GPT2, optimizer: Optimizers) -> dict[str, Any] | None:
    """The unsharded `optimizer.state_dict()` (index keys, CPU tensors) on rank 0, None elsewhere.

    A collective, like `full_model`.
    """
    state = get_optimizer_state_dict(model, optimizer.optimizers, options=GATHER)
    if dist.get_rank() != 0:
        return None
    # torch keys it by parameter name; optimizer.state_dict() numbers parameters group by group.
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]})
    return {"state": {index[name]: s for name, s in state["state"].items()}, "param_groups": groups}


def restore_optimizer(model: GPT2, optimizer: Optimizers, ckpt: RunCheckpoint) -> None:
    """Load a checkpoint's (unsharded) optimizer state into the sharded `optimizer`.

    Every rank reads the checkpoint itself, as it reads the model weights and RNG states,
    and keeps only its own slices: no communication, and nothing depends on the world size
    the checkpoint was written with.
    """
    saved = optimizer_state(ckpt)
    names = {p: name for name, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    try:
        by_name = {
            "state": {order[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
        }
        sizes = [len(g["params"]) for g in saved["param_groups"]]
        if sizes != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError(f"parameter groups of {sizes} parameters")
        set_optimizer_state_dict(
            model, optimizer.optimizers, by_name, options=StateDictOptions(full_state_dict=True)
        )
    except (ValueError, KeyError, IndexError, RuntimeError) as e:
        raise CheckpointError(
            f"{ckpt.path}: optimizer state doesn't fit this model ({e}); resume with the run's own config"
        ) from None
