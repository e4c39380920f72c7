"""Compiled decode steps: `GPT2.decode_step` built ahead of time by AOTInductor, checked
against the eager model, saved, and loaded by later processes in about a second.

Why: a decode step reads every weight once per token, so its speed is the speed at which
its matrix products stream weights. Inductor, with the weights frozen into the step,
packs each one for its C++ GEMM template, fuses the small ops between the products into
a few C++ loops and runs the whole step without Python (benchmarks/README.md has the
figures against eager `decode_step` and transformers).

Read in this order, one concept per module:

- `get.py`: `decode_step(model, ...)` and `compiled_step(model, ...)`, the one way to get a
  step: reuse the one this process loaded, else load the saved one, else build it; every
  step passes its check before it is used.
- `runtime.py`: `CompiledStep`, a loaded step as the engine calls it (and the guard that
  refuses it once the model's weights change); `TieredStep`, the one-row step beside it.
- `check.py`: the probe that compares a step with the eager model, and its tolerances.
- `build.py`: what is exported and how AOTInductor compiles it; what a build needs.
- `gpt2kit.model.stepcache`: where steps are saved, and the key that ties one to a model.

>>> step = decode_step(model, slots=8, max_len=1024, build=True)  # doctest: +SKIP
>>> logits = step(idx, input_pos, k_cache, v_cache)  # as model.decode_step  # doctest: +SKIP
"""

from gpt2kit.model.compiled.build import missing_toolchain, python_header
from gpt2kit.model.compiled.check import TOLERANCES, Verdict, check
from gpt2kit.model.compiled.get import compiled_step, decode_step, step_key
from gpt2kit.model.compiled.runtime import LENGTH_BUCKET, CompiledStep, TieredStep, Weights

__all__ = [
    "LENGTH_BUCKET",
    "TOLERANCES",
    "CompiledStep",
    "TieredStep",
    "Verdict",
    "Weights",
    "check",
    "compiled_step",
    "decode_step",
    "missing_toolchain",
    "python_header",
    "step_key",
]
