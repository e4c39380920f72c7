"""Compiled one-token decoding (opt-in, `compile=True` / `--compile`): one torch.compile graph.

Why: at batch 1 a decode step reads every weight once, so its speed is the speed at which
the matrix-vector products stream weights from memory. Eager torch (MKL) streams
cache-cold weights at 12-13 GB/s on our 2-core reference CPU; inductor with the weights
frozen into the graph and max-autotune packs each weight for its C++ GEMM template, which
streams at memory speed, and fuses the small ops between the products into a few C++
loops (benchmarks/README.md has the figures).

What it costs:
- the first step of a new shape compiles: about a minute for gpt2 (124M) on 2 cores, and a
  C++ compiler plus Python's headers on CPU;
- a graph serves one batch size and one cache length, so cache lengths are rounded up to
  a multiple of `CACHE_BUCKET` positions (the masked tail costs a little attention);
- the packed weights are a second copy of the weights in memory;
- rows that finish early keep their place in the batch (the shapes are static).
Weights are constants of the graph: a decoder notices when a weight changed (an in-place
update or a new tensor) and compiles again. Logits equal eager decoding up to float
rounding (a different summation order); greedy tokens match except at near-ties.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import Tensor, nn

from gpt2kit.errors import ConfigError
from gpt2kit.model import GPT2, KVCache

log = logging.getLogger(__name__)

CACHE_BUCKET = 256


def cache_length(needed: int, n_positions: int) -> int:
    """Cache positions to allocate for `needed`: rounded up to the bucket, within the context."""
    return max(needed, min(n_positions, -(-needed // CACHE_BUCKET) * CACHE_BUCKET))


class _DecodeGraph(nn.Module):
    """The one-token step over a static cache, as torch.compile sees it."""

    def __init__(self, model: GPT2) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, idx: Tensor, position_ids: Tensor, write_pos: Tensor, attn_mask: Tensor, k: list, v: list
    ) -> Tensor:
        caches = list(zip(k, v, strict=True))
        x = self.model.hidden_states(idx, position_ids, attn_mask, False, caches, write_pos)
        return self.model.logits(x[:, -1])  # (B, V)


def _inductor_options(device: torch.device) -> dict:
    options = {"freezing": True, "max_autotune": True}
    if device.type == "cpu":
        options["max_autotune_gemm_backends"] = "CPP,ATEN"  # the template that reads at memory speed
    return options


def _weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter is updated in place or replaced."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class CompiledDecoder:
    """`step(idx, cache)`: logits (B, V) for one new token per row, from a compiled graph.

    The cache is a `KVCache` whose prompt was prefilled by the eager model (allocate and
    fill it under `torch.inference_mode()`, as `decode_steps` does, or the graph compiles
    again for it); `step` writes position `cache.pos` and advances it, as
    `model(idx, kv_cache=cache)` does.
    """

    def __init__(self, model: GPT2) -> None:
        self.model = model
        self.weights = _weights_key(model)
        self.options = _inductor_options(model.wte.weight.device)
        self.graph = torch.compile(_DecodeGraph(model), fullgraph=True, dynamic=False)
        self.compiled_shapes: set[tuple[int, ...]] = set()

    @torch.inference_mode()
    def step(self, idx: Tensor, cache: KVCache) -> Tensor:
        B, L, pos = cache.batch_size, cache.max_len, cache.pos
        # An inference tensor, whoever made it: a graph is specialised to that too.
        idx = idx.clone()
        if idx.shape != (B, 1):
            raise ValueError(
                f"compiled decoding takes one token per row, (B, 1) = {(B, 1)}; got {tuple(idx.shape)}"
            )
        if pos >= L:
            raise ValueError(f"KV cache holds {L} positions, {pos + 1} needed")
        device = idx.device
        written = torch.arange(L, device=device) <= pos  # (L,)
        if cache.mask is None:
            mask = written.expand(B, L)
            position_ids = torch.full((B, 1), pos, dtype=torch.long, device=device)
        else:
            mask = cache.mask & written
            position_ids = cache.mask[:, :pos].sum(dim=1, keepdim=True)  # real tokens so far
        attn_mask = mask.contiguous()[:, None, None, :]  # (B, 1, 1, L): same strides every step
        write_pos = torch.tensor([pos], device=device)
        shape = (B, L)
        first = shape not in self.compiled_shapes
        if first:
            log.info("compiling the decode step for batch %d, cache %d (a minute or so on CPU)", B, L)
        # Autotuning prints a table per matrix shape on stderr; keep it for --verbose only.
        quiet = contextlib.redirect_stderr(io.StringIO()) if first else contextlib.nullcontext()
        try:
            # Patched on every call (~70 us), not only the first: a recompile dynamo starts
            # later (a guard that failed) must freeze and autotune too, or it runs slow.
            with torch._inductor.config.patch(self.options), quiet as err:
                logits = self.graph(idx, position_ids, write_pos, attn_mask, cache.k, cache.v)
        except Exception as e:
            if not first:
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = " (on CPU it needs a C++ compiler and Python's headers)" if device.type == "cpu" else ""
            raise ConfigError(
                f"compiling the decode step failed{hint}: {reason[:300]}; run without --compile"
            ) from e
        if first:
            self.compiled_shapes.add(shape)
            if err is not None and err.getvalue():
                log.debug("%s", err.getvalue())
        cache.pos = pos + 1
        return logits

    def __reduce__(self):
        # A copied or pickled model leaves its compiled graph behind and compiles its own.
        return (_nothing, ())


def _nothing() -> None:
    return None


def compiled_decoder(model: GPT2) -> CompiledDecoder:
    """The model's decoder, compiled again if its weights changed since the last one.

    It lives on the model (freed with it); a copy of the model starts without one.
    """
    decoder = model.__dict__.get("_compiled_decoder")
    if decoder is None or decoder.weights != _weights_key(model):
        decoder = CompiledDecoder(model)
        model.__dict__["_compiled_decoder"] = decoder
    return decoder


def compiled_step(
    model: GPT2, *, slots: int, max_len: int, build: bool
):  # interim until the saved step lands
    if build:
        raise ConfigError("compiled decoding is not available in this build; run without --compile")
    return None
