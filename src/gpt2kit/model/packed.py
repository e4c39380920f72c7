"""oneDNN-packed copies of a bfloat16 model's weights, for the server's eager forward passes.

On CPU, `F.linear` with a bfloat16 weight runs a oneDNN matmul that first reorders the
weight into oneDNN's blocked layout, on every call. For a prefill of a dozen tokens that
reorder is a third of the time: gpt2 124M, 13 tokens, 2 cores with AVX512-BF16, 24 ms
with `F.linear`, 15 ms with weights reordered once (benchmarks/README.md, "Packed
prefill"); the tied lm_head's one-row product 4.2 ms against 2.1 ms. `PackedWeights` does
that reorder once (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing
does) and `active()` routes the blocks' Linears and `GPT2.logits` through the packed
copies (`torch.ops.mkldnn._linear_pointwise`) while a forward pass runs.

The products are the same oneDNN kernels on the same values, so the results are the same
bits as `F.linear`'s: checked at every row count the engine uses
(tests/model/test_packed.py, on the machine that runs the suite). That is why only
bfloat16 is packed: for float32, `F.linear` runs MKL's sgemm, and oneDNN's float32 kernel
sums in another order (2x faster prefill here, but not the same bits as `complete`).

What it costs: a second copy of the packed weights (the blocks and the lm_head: 247 MB for
gpt2 124M) and a reorder at start (`pack_seconds`). The server (a long-lived engine) uses
it; `generate` and `complete`, which make an engine per call, do not.

>>> packed = PackedWeights.of(model)  # doctest: +SKIP
>>> with packed.active():  # doctest: +SKIP
...     model.prefill(ids, k, v)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from gpt2kit.errors import ConfigError
from gpt2kit.model.compiled.build import first_line
from gpt2kit.model.compiled.runtime import Weights
from gpt2kit.model.gpt2 import GPT2

# The row count oneDNN picks its packed layout for; every count (1 to hundreds) gives the
# same bits, and its speed was the same for 1 to 100 rows here.
PACKED_FOR_ROWS = 16


class PackedWeights:
    """Packed copies of `model`'s block Linear weights and tied lm_head (see the module
    docstring). Make one with `PackedWeights.of`, which says why not where it can't."""

    def __init__(self, model: GPT2) -> None:
        t0 = time.perf_counter()
        self._model = model
        self._linears: list[tuple[nn.Linear, Tensor]] = []
        with torch.no_grad():
            for module in model.h.modules():
                if isinstance(module, nn.Linear):
                    self._linears.append((module, _pack(module.weight)))
            self._lm_head = _pack(model.wte.weight[: model.config.vocab_size])
        self._weights = Weights(model)
        self.pack_seconds = time.perf_counter() - t0

    @staticmethod
    def of(model: GPT2) -> tuple[PackedWeights | None, str]:
        """(packed weights, what was decided and why) for `model` as it is now: None where
        packing doesn't apply (not CPU, not bfloat16, quantized) or oneDNN can't pack
        bfloat16 on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
        weight = model.wte.weight
        if weight.device.type != "cpu":
            return None, f"not packed: the model is on {weight.device.type}, packing is for CPU"
        if weight.dtype != torch.bfloat16:
            return (
                None,
                f"not packed: packing is for bfloat16 weights, these are {str(weight.dtype).removeprefix('torch.')}",
            )
        if getattr(model, "quantization", None) is not None or "lm_head" in model._modules:
            return None, "not packed: the model is quantized (its int8 products pack their own weights)"
        if not torch.backends.mkldnn.is_available():
            return None, "not packed: this torch has no oneDNN"
        try:
            packed = PackedWeights(model)
        except RuntimeError as e:  # oneDNN refuses bfloat16 below AVX-512 (or AVX-NE-CONVERT)
            return None, f"not packed: oneDNN can't pack bfloat16 weights on this CPU ({first_line(e)})"
        megabytes = sum(w.numel() for w in (*(w for _, w in packed._linears), packed._lm_head)) * 2 / 1e6
        return packed, (
            f"packed the weights for oneDNN in {packed.pack_seconds:.1f}s "
            f"({megabytes:.0f} MB): faster prefill, the same bits"
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """While inside, the model's block Linears and `logits` compute with the packed
        weights. Raises ConfigError if the model's weights changed since they were packed.
        Not for a model that another thread runs at the same time."""
        if not self._weights.unchanged():
            raise ConfigError(
                "the model's weights changed after they were packed (training, load_state_dict); "
                "pack them again (PackedWeights.of)"
            )
        model = self._model
        for module, packed in self._linears:
            module.forward = _PackedLinear(packed, module.bias)
        model.logits = _PackedLinear(self._lm_head, None)
        try:
            yield
        finally:
            for module, _ in self._linears:
                del module.forward
            del model.logits


class _PackedLinear:
    """`F.linear(x, W, b)` with W packed: x (..., in) -> (..., out)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


def _pack(weight: Tensor) -> Tensor:
    # From the [out, in] row-major copy: reordering the decode layout ([in, out] in memory,
    # `use_decode_layout`) directly was 4-10x slower.
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACKED_FOR_ROWS)
