"""How a run spreads over processes: one process, DDP replicas or FSDP shards, behind one interface.

`start_parallel(kind, device)` gives this process its strategy. Without torchrun (or with
one process) that is `Parallel` itself: nothing to wrap, synchronise or gather. Under
torchrun (WORLD_SIZE > 1) the process joins the process group (NCCL on GPUs, gloo on CPU)
and gets `DDP` (`parallel = "ddp"`: a full replica per process) or `FSDP` (`"fsdp"`). The
loop calls the same methods whichever it has: `shard` and `wrap` the model, `no_sync` for
the micro-steps that only accumulate, `clip_grad_norm`, `mean` and `max_over_ranks` to
agree on losses and stops, `full_model` and `full_optimizer_state` for checkpoints and
`restore_optimizer` on resume.

FSDP (PyTorch's FSDP2 `fully_shard`) makes every Block, then the model (wte, wpe, ln_f), one
unit: each parameter becomes a DTensor holding 1/N of its rows on each of the N processes,
and so do its gradient and its optimizer state. A Block's full weights exist only while it
runs (all-gathered before its forward and backward, freed after); gradients are
reduce-scattered, so each process keeps only the gradient of its own shard. Checkpoints keep
the single-process format (training/checkpoint.py): the full state is gathered onto rank 0's
CPU, and on resume each rank keeps its slice of the saved state. docs/training.md says what
this costs in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpt2kit.model.gpt2 import GPT2, sinusoidal_table
from gpt2kit.training import checkpoint
from gpt2kit.training.checkpoint import RunCheckpoint
from gpt2kit.training.optim import Optimizers

log = logging.getLogger(__name__)


def torchrun_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun set them; (0, 0, 1) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def start_parallel(kind: str, device: torch.device) -> Parallel:
    """This process's strategy: `Parallel` alone, else `DDP` or `FSDP` (`kind`) in the process group."""
    rank, local_rank, world = torchrun_env()
    if world <= 1:  # one process: parallel="fsdp" has nothing to shard, the run is a plain one
        return Parallel(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    strategy = FSDP if kind == "fsdp" else DDP
    return strategy(device, rank=rank, local_rank=local_rank, world_size=world)


@dataclass
class Parallel:
    """One process: the model trains as it is. DDP and FSDP override what differs."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes metrics, checkpoints and the final model."""
        return self.rank == 0

    def shard(self, model: GPT2, *, amp: torch.dtype | None, optimizer: str) -> torch.dtype | None:
        """Prepare `model` in place before the optimizer sees its parameters; returns the
        autocast dtype left for the loop (FSDP computes in bf16 itself)."""
        return amp

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop trains: `model` (compiled when asked) or a wrapper around it."""
        return model

    def no_sync(self) -> AbstractContextManager[Any]:
        """Backward passes inside only accumulate gradients; the next one outside averages them."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to `max_norm`; returns the norm before clipping."""
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def mean(self, t: torch.Tensor) -> None:
        """Replace `t` in place by its mean over the processes."""

    def sum(self, t: torch.Tensor) -> None:
        """Replace `t` in place by its sum over the processes."""

    def max_over_ranks(self, values: list[float]) -> list[float]:
        """Each value's maximum over the processes, so all stop at the same step with the same lr."""
        return values

    def barrier(self) -> None:
        """Wait until every process got here."""

    def eval_batches(self, iters: int) -> range:
        """The indices of the `iters` evaluation batches this process scores: r, r + N, ..."""
        return range(self.rank, iters, self.world_size)

    def full_model(self, model: GPT2) -> GPT2 | None:
        """The whole model on rank 0 (None elsewhere), e.g. for save_model; a collective under FSDP."""
        return model

    def full_optimizer_state(self, model: GPT2, optimizer: Optimizers) -> Optimizers | dict[str, Any] | None:
        """What save_checkpoint stores: the optimizer, or its gathered state dict (None off rank 0)."""
        return optimizer

    def restore_optimizer(self, model: GPT2, optimizer: Optimizers, ckpt: RunCheckpoint) -> None:
        """Load a checkpoint's optimizer state into `optimizer` (model weights came with the model)."""
        checkpoint.restore_optimizer(optimizer, ckpt)

    def close(self) -> None:
        """Leave the process group (nothing to leave for one process)."""


class ProcessGroup(Parallel):
    """The collectives DDP and FSDP share: several processes, one torch.distributed group."""

    def mean(self, t: torch.Tensor) -> None:
        dist.all_reduce(t)
        t /= self.world_size

    def sum(self, t: torch.Tensor) -> None:
        dist.all_reduce(t)

    def max_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, device=self.device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        dist.destroy_process_group()


class DDP(ProcessGroup):
    """DistributedDataParallel: a full replica per process, gradients all-reduced in backward."""

    _wrapped: nn.parallel.DistributedDataParallel | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self._wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return self._wrapped

    def no_sync(self) -> AbstractContextManager[Any]:
        assert self._wrapped is not None, "no_sync needs the model that went through wrap()"
        return self._wrapped.no_sync()


class FSDP(ProcessGroup):
    """Fully sharded data parallel: weights, gradients and optimizer state split over the processes.

    torch's FSDP and distributed-checkpoint modules are imported in the methods: they take
    about as long to import as torch itself, and only FSDP runs need them.
    """

    _sharded: GPT2 | None = None

    def shard(self, model: GPT2, *, amp: torch.dtype | None, optimizer: str) -> torch.dtype | None:
        """With bf16 the all-gathered weights (and so forward and backward) are bf16 while the
        shards, the optimizer state and the gradient reduction stay float32: this replaces
        autocast. float16 stays autocast, as with DDP."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = amp == torch.bfloat16
        # The mesh is explicit: FSDP's default is a CUDA mesh whenever CUDA exists, even for device=cpu.
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
        )
        for block in model.h:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self._sharded = model
        if self.main:
            log.info(
                "FSDP: weights, gradients and %s state sharded over %d processes%s",
                "Muon and AdamW" if optimizer == "muon" else "AdamW",
                self.world_size,
                " (bf16 compute, float32 reduction)" if bf16 else "",
            )
        return None if bf16 else amp

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        # FSDP2 reads the flag in backward (DDP reads it in forward), so the backward pass must
        # run inside the block. The next backward outside reduce-scatters the accumulated sum.
        model = self._sharded
        assert model is not None, "no_sync needs a model that went through shard()"
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return super().clip_grad_norm(model, max_norm).full_tensor()  # a replicated DTensor: all shards' norm

    def eval_batches(self, iters: int) -> range:
        # Every forward is a collective all-gather, so all ranks run the same number: when N
        # doesn't divide `iters`, the ranks short of one score a batch again (the loop doesn't count it).
        return range(self.rank, -(-iters // self.world_size) * self.world_size, self.world_size)

    def full_model(self, model: GPT2) -> GPT2 | None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        weights = get_model_state_dict(model, options=_gather())
        if not self.main:
            return None
        with torch.device("meta"):
            plain = GPT2(model.config)
        plain.load_state_dict(weights, assign=True)
        if model.config.position_embedding == "sinusoidal":  # a non-persistent buffer, still on meta
            plain.wpe_table = sinusoidal_table(model.config.n_positions, model.config.n_embd)
        return plain.eval()

    def full_optimizer_state(self, model: GPT2, optimizer: Optimizers) -> dict[str, Any] | None:
        """The unsharded `optimizer.state_dict()` (index keys, CPU tensors) on rank 0."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer.optimizers, options=_gather())
        if not self.main:
            return None
        # torch keys it by parameter name; optimizer.state_dict() numbers parameters group by group.
        index: dict[str, int] = {}
        groups = []
        for group in state["param_groups"]:
            groups.append(
                {**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]}
            )
        return {"state": {index[name]: s for name, s in state["state"].items()}, "param_groups": groups}

    def restore_optimizer(self, model: GPT2, optimizer: Optimizers, ckpt: RunCheckpoint) -> None:
        """Every rank reads the checkpoint itself and keeps only its own slices: no
        communication, and nothing depends on the world size the checkpoint was written with."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        saved = checkpoint.optimizer_state(ckpt)
        names = {p: name for name, p in model.named_parameters()}
        order = [names[p] for group in optimizer.param_groups for p in group["params"]]
        try:
            by_name = {
                "state": {order[i]: s for i, s in saved["state"].items()},
                "param_groups": [
                    {**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]
                ],
            }
            sizes = [len(g["params"]) for g in saved["param_groups"]]
            if sizes != [len(g["params"]) for g in optimizer.param_groups]:
                raise ValueError(f"parameter groups of {sizes} parameters")
            set_optimizer_state_dict(
                model, optimizer.optimizers, by_name, options=StateDictOptions(full_state_dict=True)
            )
        except (ValueError, KeyError, IndexError, RuntimeError) as e:
            raise checkpoint.optimizer_mismatch(ckpt, e) from None


def _gather() -> Any:
    """Gathered state goes to rank 0's CPU only: a full copy on every GPU is what FSDP avoids."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)
