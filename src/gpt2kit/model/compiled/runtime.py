"""A loaded compiled step as the engine calls it, and the guard on the model's weights.

`CompiledStep` wraps AOTInductor's runner: it takes `GPT2.decode_step`'s arguments, checks
them, picks how much of the cache the call reads, and refuses to run once the model's
weights are no longer the ones the step was checked against (`Weights`). It holds the model
and its weights by weak reference only: the step keeps its own packed copy of the weights
inside the library, so a swapped-out parameter is freed as soon as nothing else holds it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from gpt2kit.errors import ConfigError
from gpt2kit.model.gpt2 import GPT2

# Calls attend over the positions in use rounded up to this: less cache to read than the
# whole max_len, at most ~64 masked positions more than needed.
LENGTH_BUCKET = 64


class Weights:
    """Which tensors a model's parameters and buffers are, and their versions, right now.

    The one staleness fingerprint of the compiled stack. A step's weights are frozen into
    its library, so the step is right only while every parameter and buffer of the model is
    the tensor it was checked against, never updated in place (version counter) nor given
    new data (`.data =`, data pointer). Everything is held by weak reference: a swapped-out
    tensor (`load_state_dict(..., assign=True)`) dies, and its reference with it.

    `unchanged()` re-reads each captured (module, name) slot: cheap enough for every decode
    call (~60 us for gpt2's 148 tensors). `same_as(model)` also walks the model's modules,
    so a replaced submodule counts as a change; it runs when a step is fetched.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = [weakref.ref(m) for m in model.modules()]
        self._slots = [
            (weakref.ref(m), table, name, weakref.ref(t), _version(t), _pointer(t))
            for m, table, name, t in _tensors(model)
        ]

    def unchanged(self) -> bool:
        """Every captured slot still holds its tensor, at the same version and data."""
        for module_ref, table, name, tensor_ref, version, pointer in self._slots:
            module = module_ref()
            if module is None:
                return False
            t = module.__dict__[table].get(name)
            if (
                t is None
                or t is not tensor_ref()
                or (version is not None and t._version != version)
                or (pointer is not None and t.data_ptr() != pointer)
            ):
                return False
        return True

    def same_as(self, model: nn.Module) -> bool:
        """`model` is made of the captured modules and tensors, none of them changed."""
        modules = list(model.modules())
        if len(modules) != len(self._modules):
            return False
        if any(m is not r() for m, r in zip(modules, self._modules, strict=True)):
            return False
        return len(list(_tensors(model))) == len(self._slots) and self.unchanged()


def _tensors(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, Tensor]]:
    for m in model.modules():
        for table in ("_parameters", "_buffers"):
            for name, t in getattr(m, table).items():
                if t is not None:
                    yield m, table, name, t


def _version(t: Tensor) -> int | None:
    # An inference tensor keeps no version counter (it can't be updated outside inference mode).
    return None if t.is_inference() else t._version


def _pointer(t: Tensor) -> int | None:
    try:
        return t.data_ptr()
    except RuntimeError:  # a wrapper subclass (torchao's int8) has no storage of its own
        return None


class CompiledStep:
    """A loaded compiled step: `step(idx, input_pos, k_cache, v_cache)` as `GPT2.decode_step`.

    `idx` (b, 1) int64, `input_pos` (b,) int64, `k_cache[i]`/`v_cache[i]` (b, nh, L, hs)
    contiguous, in the model's dtype and on its device, 1 <= b <= `slots`, any L up to the
    context. Writes each row's key/value at its position in place and returns (b, V) logits.
    Raises ConfigError once the model's weights changed (`Weights`): get a new step then.
    """

    def __init__(self, model: GPT2, runner, *, slots: int, max_len: int, library, weights: Weights) -> None:
        self.slots = slots
        self.max_len = max_len
        self.library = library
        self._model = weakref.ref(model)
        self._runner = runner
        self._weights = weights
        self._spans: dict[int, Tensor] = {}

    def batch_size(self, n: int) -> int:
        """Rows to call with for `n` active ones: `n` itself (the batch is dynamic)."""
        if not 1 <= n <= self.slots:
            raise ValueError(f"the compiled step takes 1 to {self.slots} rows, not {n}")
        return n

    def __call__(
        self, idx: Tensor, input_pos: Tensor, k_cache: list[Tensor], v_cache: list[Tensor]
    ) -> Tensor:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this compiled step was deleted")
        if not self._weights.unchanged():
            raise ConfigError(
                "the model's weights changed after its compiled step was loaded (training, "
                "load_state_dict); get a step for the new weights (generate() does at each call)"
            )
        b, L = idx.shape[0], k_cache[0].shape[2]
        if not 1 <= b <= self.slots:
            raise ValueError(f"the compiled step takes 1 to {self.slots} rows, got {b}")
        if not all(t.is_contiguous() for t in (*k_cache, *v_cache)):
            raise ValueError("the compiled step needs contiguous caches, (b, nh, L, hs) each")
        needed = int(input_pos.max()) + 1
        if needed > L:
            raise ValueError(
                f"a row at position {needed - 1} needs {needed} cache positions, the cache has {L}"
            )
        span = min(-(-needed // LENGTH_BUCKET) * LENGTH_BUCKET, L - 1)
        if needed > span or span < 2:
            # Only a row at the cache's last position needs all of it; the graph is traced
            # for a part of 2 or more positions (build.StepGraph): that call runs eagerly.
            return model.decode_step(idx, input_pos, k_cache, v_cache)
        # The library reads its inputs as dense row-major memory: a strided view (a beam's
        # tokens, running[:, :, t]) would be read as other tokens.
        idx, input_pos = idx.contiguous(), input_pos.contiguous()
        return self._runner.run([idx, input_pos, *k_cache, *v_cache, self._span(span, idx.device)])[0]

    def _span(self, n: int, device) -> Tensor:
        """How many cache positions the call reads, as the length of an empty (n, 0) tensor:
        the runner takes tensors only, and a tensor's size is a dynamic dimension of the graph."""
        if n not in self._spans:
            self._spans[n] = torch.empty(n, 0, device=device)
        return self._spans[n]


class TieredStep:
    """A step for up to `many.slots` rows that runs one row on `one`, a step built for exactly
    one row. A batch of one is a static shape there, and inductor's kernels for it are faster
    than the dynamic-batch ones (benchmarks/README.md, "Generation"), and one row is what a
    lone request, or the last row of a batch, decodes. The engine packs running rows into the
    first slots, so a lone row is in slot 0."""

    def __init__(self, one: CompiledStep, many: CompiledStep) -> None:
        if one.slots != 1:
            raise ValueError(f"`one` must be a step for 1 row, not {one.slots}")
        self.one, self.many = one, many
        self.slots, self.max_len = many.slots, many.max_len

    def batch_size(self, n: int) -> int:
        return self.many.batch_size(n)

    def __call__(
        self, idx: Tensor, input_pos: Tensor, k_cache: list[Tensor], v_cache: list[Tensor]
    ) -> Tensor:
        step = self.one if idx.shape[0] == 1 else self.many
        return step(idx, input_pos, k_cache, v_cache)
