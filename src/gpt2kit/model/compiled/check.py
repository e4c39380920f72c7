"""A compiled step proves itself before it is used: the probe, and the tolerances it allows.

A step is machine code generated for one CPU (or GPU) by a compiler we don't control; a
miscompiled one (GCC 12's AMX tile-config bug turns an int8 step into garbage on AMX CPUs)
or one built for other weights looks just as fast as a good one. So every step, freshly
built or loaded from the cache, first runs on a probe input and is compared with the eager
model's `decode_step` on the same input. On a mismatch it is never saved (built) or is
removed (loaded), and the caller decodes eagerly.

The probe: `min(slots, 3)` rows at positions spread over a cache of `min(n_positions, 256)`
positions, random keys and values (a fixed seed), random tokens; two calls, the second at
the next positions with the first call's greedy tokens, so it also reads the keys and
values the first one wrote.

The bound: max |compiled logit - eager logit| over the probe, relative to the eager logits'
scale (their largest magnitude), must not exceed `TOLERANCES` for the model's precision,
and at every row the compiled greedy token must be one the eager logits rank within twice
that bound of their best (a different token only at a near-tie). Correct steps of a
2-layer, 768-wide GPT-2 (vocabulary 50257, random weights) on this project's AVX-512 CPU
differ from eager by at most (5 probe seeds, and 32 greedy decode steps after a 100-token
prompt): float32 2.0e-6, bfloat16 9.6e-3, int8-dynamic 2.5e-2, int8-weight-only (bfloat16
activations) 1.3e-2, with every greedy token equal. The bounds leave 8-50x of margin over
that; garbage (a step for other weights, a miscompiled one) differs by the order of the
scale itself. The probe costs about 0.4 s of CPU time for gpt2 124M in float32 (0.25 s in
bfloat16), most of it the eager reference; it runs once per step a process loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gpt2kit.model.compiled.build import evaluating
from gpt2kit.model.gpt2 import GPT2

# max |Δlogit| / max |eager logit| a correct step stays within, per precision.
TOLERANCES = {
    "float32": 1e-4,
    "bfloat16": 0.1,
    "int8-dynamic": 0.25,
    "int8-weight-only": 0.1,
}
PROBE_POSITIONS = 256
PROBE_ROWS = 3


@dataclass(frozen=True)
class Verdict:
    """How a step compared with the eager model on the probe."""

    error: float  # max |Δlogit| / the eager logits' scale
    bound: float  # the tolerance for this precision
    precision: str
    tokens_off: int  # rows whose compiled greedy token the eager logits don't rank near the top
    rows: int  # rows compared (over both calls)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound and self.tokens_off == 0

    def __str__(self) -> str:
        return (
            f"max |Δlogit| {self.error:.3g} of the logits' scale (bound {self.bound:g} for "
            f"{self.precision}), {self.tokens_off} of {self.rows} greedy tokens off"
        )


def precision_of(model: GPT2) -> str:
    """The key of `TOLERANCES` for `model`: its int8 scheme, else its dtype."""
    quantization = getattr(model, "quantization", None)
    if quantization in TOLERANCES:
        return quantization
    return str(model.wte.weight.dtype).removeprefix("torch.")


def check(model: GPT2, step, *, seed: int = 0) -> Verdict:
    """Run `step` (a CompiledStep of `model`) and `model.decode_step` on the probe; compare."""
    start = time.perf_counter()
    config = model.config
    device, dtype = model.wte.weight.device, model.wte.weight.dtype
    b = min(step.slots, PROBE_ROWS)
    L = min(config.n_positions, PROBE_POSITIONS)
    g = torch.Generator().manual_seed(seed)
    shape = (b, config.n_head, L, config.head_size)
    # One random block of keys and one of values, copied into every layer: drawing them per
    # layer would cost as much as the probe's four decode calls.
    k_random, v_random = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    k, v = (
        [k_random.clone() for _ in range(config.n_layer)],
        [v_random.clone() for _ in range(config.n_layer)],
    )
    k_eager, v_eager = [t.clone() for t in k], [t.clone() for t in v]
    idx = torch.randint(0, config.vocab_size, (b, 1), generator=g).to(device)
    input_pos = torch.tensor([(L - 3) * (i + 1) // b for i in range(b)], device=device)  # the last: L - 3
    precision = precision_of(model)
    bound = TOLERANCES.get(precision, TOLERANCES["bfloat16"])
    error, off = 0.0, 0
    with torch.inference_mode(), evaluating(model):
        for _ in range(2):  # the second call reads what the first one wrote
            want = model.decode_step(idx, input_pos, k_eager, v_eager).float()
            got = step(idx, input_pos, k, v).float()
            scale = want.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
            error = max(error, float(((got - want).abs().amax() / scale).nan_to_num(float("inf"))))
            best = want.amax(dim=-1)
            chosen = want.gather(1, got.argmax(dim=-1, keepdim=True))[:, 0]
            off += int((chosen < best - 2 * bound * scale).sum())
            idx, input_pos = want.argmax(dim=-1, keepdim=True), input_pos + 1
    return Verdict(error, bound, precision, off, 2 * b, time.perf_counter() - start)
