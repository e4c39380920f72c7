"""What each precision and decode path may cost, stated once, and the measurements that check it.

`BOUNDS` is the table docs/numerics.md explains; tests/model/test_numerics.py and
benchmarks/bench_numerics.py hold every option to it, at every CPU level the machine can
emulate (`gpt2kit.device.CPU_LEVELS`). An option is a precision ("fp32", "bf16", "int8":
`quantize="int8"` on float32 weights) decoded eagerly or by a compiled step. Its checks:

- `compiled_logits`: the largest |logit difference| between the compiled step and eager
  `decode_step` of the same precision, fed the same tokens: the prompt's prefill, then
  `DECODE_STEPS` decode steps (`decode_logits`).
- `depth_vs_fp32`: greedy decoding agrees with the fp32 reference for at least this many of
  `GREEDY_TOKENS` tokens (`first_mismatch`); fp32's reference is transformers.
- `depth_compiled`: compiled greedy tokens equal the same precision's eager ones for at
  least this many tokens.
- `nll_rel`: the mean next-token NLL on real text, scored through the same decode path
  (`mean_nll`), differs from fp32 eager's by at most this fraction.

Greedy decoding picks the largest logit, so once two options' logits differ by rounding, the
first near-tie between the two best tokens makes them part. Where that happens depends on
the model: the depths are bounds for the models the checks use (a random gpt2 124M and a
2-layer model of width 768), not a promise for every model.

>>> first_mismatch([1, 2, 3], [1, 2, 4])
2
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gpt2kit.model.compiled import compiled_step
from gpt2kit.model.gpt2 import GPT2

GREEDY_TOKENS = 64  # greedy tokens compared per option
DECODE_STEPS = 32  # decode steps after the prefill whose logits are compared

Step = Callable[[Tensor, Tensor, list[Tensor], list[Tensor]], Tensor]


@dataclass(frozen=True)
class Bound:
    """What one precision may cost (see the module docstring for each field)."""

    compiled_logits: float
    depth_vs_fp32: int
    depth_compiled: int
    nll_rel: float


BOUNDS: dict[str, Bound] = {
    "fp32": Bound(compiled_logits=1e-3, depth_vs_fp32=64, depth_compiled=64, nll_rel=1e-4),
    "bf16": Bound(compiled_logits=0.25, depth_vs_fp32=16, depth_compiled=8, nll_rel=0.005),
    "int8": Bound(compiled_logits=0.25, depth_vs_fp32=8, depth_compiled=8, nll_rel=0.005),
}
PRECISIONS = tuple(BOUNDS)


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share (the shorter's length when one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def load(path: str | os.PathLike[str], precision: str) -> GPT2:
    """The model directory `path` loaded for `precision`: "fp32", "bf16", or "int8" (int8
    weights, float32 activations: `quantize="int8"` as a user loads it)."""
    if precision not in BOUNDS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(BOUNDS)}")
    dtype = "bfloat16" if precision == "bf16" else "float32"
    return GPT2.from_pretrained(path, dtype=dtype, quantize="int8" if precision == "int8" else None)


class _Caches:
    """One row's KV cache over the whole context, so no call needs its last position (a
    compiled step runs that one call eagerly)."""

    def __init__(self, model: GPT2) -> None:
        cfg = model.config
        shape = (1, cfg.n_head, cfg.n_positions, cfg.head_size)
        self.k = [torch.zeros(shape, dtype=model.wte.weight.dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=model.wte.weight.dtype) for _ in range(cfg.n_layer)]


@torch.inference_mode()
def decode_logits(
    model: GPT2, prompt: Sequence[int], tokens: Sequence[int], *, step: Step | None = None
) -> Tensor:
    """Float32 logits (1 + len(tokens), V): the prompt's last position after an eager prefill,
    then one decode step per token of `tokens`, fed in order whatever the logits say (so two
    decode paths are compared on the same inputs). `step` is a compiled step, or None for
    `model.decode_step`."""
    return torch.stack(list(_decode(model, prompt, lambda i, logits: tokens[i], len(tokens), step)))


@torch.inference_mode()
def greedy(model: GPT2, prompt: Sequence[int], n: int, *, step: Step | None = None) -> list[int]:
    """`n` greedy tokens after `prompt`: an eager prefill, then `step` (None: `model.decode_step`)
    for each new token, as the generation engine decodes a lone prompt."""
    if n < 1:
        return []
    tokens: list[int] = []

    def pick(i: int, logits: Tensor) -> int:
        tokens.append(int(logits.argmax()))
        return tokens[-1]

    *_, last = _decode(model, prompt, pick, n - 1, step)  # the last token needs no step after it
    return [*tokens, int(last.argmax())]


def _decode(
    model: GPT2, prompt: Sequence[int], next_token: Callable[[int, Tensor], int], n: int, step: Step | None
):
    """Yields float32 logits (V,) at the prompt's end and after each of `n` fed tokens;
    `next_token(i, logits)` gives the i-th token to feed."""
    step = step if step is not None else model.decode_step
    if len(prompt) + n >= model.config.n_positions:
        raise ValueError(
            f"{len(prompt)} + {n} positions do not fit the context of {model.config.n_positions} - 1"
        )
    cache = _Caches(model)
    T = len(prompt)
    logits = model.logits(
        model.prefill(
            torch.tensor([list(prompt)]), [t[:, :, :T] for t in cache.k], [t[:, :, :T] for t in cache.v]
        )[:, -1]
    )[0].float()
    yield logits
    for i in range(n):
        token = next_token(i, logits)
        logits = step(torch.tensor([[token]]), torch.tensor([T + i]), cache.k, cache.v)[0].float()
        yield logits


def mean_nll(model: GPT2, ids: Sequence[int], *, step: Step | None = None) -> float:
    """Mean next-token negative log-likelihood (nats) of `ids[1:]`, scored through the decode
    path: `ids[0]` prefilled, then one `step` per token (see `decode_logits`), so eager and
    compiled steps are scored the same way. `ids` must fit the context."""
    if len(ids) < 2:
        raise ValueError("mean_nll needs at least 2 tokens")
    logits = decode_logits(model, ids[:1], ids[1:-1], step=step)  # (len(ids) - 1, V)
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(list(ids[1:]))))


def nll_delta(nll: float, reference: float) -> float:
    """|nll - reference| / reference: the relative change in mean NLL (log-perplexity)."""
    return abs(nll - reference) / reference if reference else math.inf


def check(
    precision: str,
    *,
    compiled_logits: float | None = None,
    depth_vs_fp32: int | None = None,
    depth_compiled: int | None = None,
    nll_rel: float | None = None,
) -> list[str]:
    """The ways measurements break `BOUNDS[precision]`, in words (empty when all hold).
    A measurement given as None is not checked."""
    bound = BOUNDS[precision]
    failures = []
    if compiled_logits is not None and not compiled_logits <= bound.compiled_logits:
        failures.append(f"compiled vs eager max |dlogit| {compiled_logits:.3g} > {bound.compiled_logits:g}")
    if depth_vs_fp32 is not None and depth_vs_fp32 < bound.depth_vs_fp32:
        failures.append(f"first mismatch vs fp32 at token {depth_vs_fp32} < {bound.depth_vs_fp32}")
    if depth_compiled is not None and depth_compiled < bound.depth_compiled:
        failures.append(
            f"compiled leaves its eager tokens at token {depth_compiled} < {bound.depth_compiled}"
        )
    if nll_rel is not None and not nll_rel <= bound.nll_rel:
        failures.append(f"mean NLL differs from fp32's by {nll_rel:.3g} > {bound.nll_rel:g}")
    return failures


def measure(
    model: GPT2,
    *,
    compiled: bool,
    prompt: Sequence[int],
    text: Sequence[int],
    n: int = GREEDY_TOKENS,
    tokens_only: bool = False,
) -> dict:
    """One option's measurements: `n` greedy tokens after `prompt` and the mean NLL of `text`,
    decoded by the compiled step (built if needed) or eagerly; for a compiled step also its
    eager twin's tokens and NLL, and the largest |logit difference| from eager over the
    prefill and `DECODE_STEPS` decode steps fed eager's greedy tokens. `tokens_only`: the
    greedy tokens alone (to compare two processes).

    Raises RuntimeError when `compiled` and no compiled step is to be had (so a fallback to
    eager is never measured as a compiled step).
    """
    step = None
    if compiled:
        step = compiled_step(model, slots=1, max_len=model.config.n_positions, build=True, exact=True)
        if step is None:
            raise RuntimeError("no compiled step was built or loaded for this model")
    out: dict = {"tokens": greedy(model, prompt, n, step=step)}
    if tokens_only:
        return out
    out["nll"] = mean_nll(model, text, step=step)
    if compiled:
        eager = greedy(model, prompt, n)
        forced = eager[:DECODE_STEPS]
        diff = decode_logits(model, prompt, forced, step=step) - decode_logits(model, prompt, forced)
        out.update(
            eager_tokens=eager, eager_nll=mean_nll(model, text), compiled_logits=float(diff.abs().max())
        )
    return out


def measure_dir(path: str, *, precision: str, **options: Any) -> dict:
    """`measure(model, **options)` on the model directory `path` loaded for `precision`, with
    what decided the kernels: torch's CPU capability, inductor's vector ISA, the int8 scheme."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    model = load(path, precision)
    return {
        **measure(model, **options),
        "precision": precision,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "inductor_isa": str(pick_vec_isa()),
        "scheme": getattr(model, "quantization", None),
    }
