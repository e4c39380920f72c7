"""Int8 quantization (opt-in: `quantize="int8"`, `--quantize int8`) through torchao's schemes.

Two schemes; `pick_scheme` chooses the faster one for the hardware and the model's dtype,
`quantize_int8` applies one in place:

- "int8-dynamic": int8 weights per output channel, and activations quantized per token at
  run time, so the matrix products are int8 x int8 (`torch._int_mm`, which inductor turns
  into VNNI/AMX micro-kernels). torchao's `Int8DynamicActivationInt8WeightConfig`. Picked
  for float32 models on CPUs with int8 dot products (AVX512-VNNI, AVX-VNNI, AMX, Arm dot).
- "int8-weight-only": int8 weights, float activations. torchao's `Int8WeightOnlyConfig`.
  Picked for bfloat16 models on CPUs with native bf16 (inductor's bf16 x int8 kernel), on
  GPUs (unmeasured), and on CPUs without int8 dot products (there it saves memory but is
  not faster than float32).

What is quantized: the four Linear layers of every block and the output projection. GPT-2
ties the output projection to the token embedding `wte`; quantizing gives it an untied int8
copy, `model.lm_head` (`GPT2.logits` uses it), and `wte` stays float for the lookups.
LayerNorms, biases and the position table stay float.

int8 pays only in the compiled decode step (`gpt2kit.model.compiled`), where inductor fuses the
quantization into its int8 kernels: 2-3x float32's tokens/s on gpt2. Eager, torchao runs
it as separate ops and int8 is slower than float32 (benchmarks/README.md has both, and
the quality cost: perplexity +0.02-0.05%).

>>> model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10, n_positions=8))
>>> quantize_int8(model, scheme="int8-weight-only")
'int8-weight-only'
>>> type(model.h[0].mlp.c_fc.weight).__name__, model.lm_head.out_features
('Int8Tensor', 10)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

import gpt2kit.device
from gpt2kit.errors import ConfigError

log = logging.getLogger(__name__)

SCHEMES = ("int8-dynamic", "int8-weight-only")
METHODS = ("int8", *SCHEMES)  # what `quantize=` accepts: "int8" lets `pick_scheme` choose


def pick_scheme(device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """The faster int8 scheme for a model computing in `dtype` on `device`, and why, in words.

    On a CPU, measured on the decode step (benchmarks/README.md): bf16 activations on a CPU
    with native bf16 go fastest through inductor's bf16 x int8 kernel (weight-only); float32
    activations through int8 x int8 products where the CPU has int8 dot products (dynamic).

    >>> pick_scheme("cuda")
    ('int8-weight-only', 'the dynamic scheme is for CPUs with int8 dot products')
    """
    device = torch.device(device)
    if device.type != "cpu":
        return "int8-weight-only", "the dynamic scheme is for CPUs with int8 dot products"
    bf16 = gpt2kit.device.cpu_bf16()
    if dtype == torch.bfloat16 and bf16 is not None:
        return "int8-weight-only", f"bfloat16 activations on a CPU with {bf16}"
    int8 = gpt2kit.device.cpu_int8()
    if int8 is not None:
        return "int8-dynamic", f"this CPU has {int8}"
    return "int8-weight-only", (
        "this CPU has no int8 dot-product instructions (VNNI, AMX): smaller, not faster than float32"
    )


def check_method(quantize: str | None) -> None:
    """A one-line ConfigError unless `quantize` is None, "int8" or one of `SCHEMES`."""
    if quantize is not None and quantize not in METHODS:
        raise ConfigError(f"quantize={quantize!r} is not supported; use one of {', '.join(METHODS)} or None")


@torch.no_grad()
def quantize_int8(model: nn.Module, *, scheme: str | None = None) -> str:
    """Quantize `model`'s blocks and output projection to int8 in place, for inference.

    `scheme`: "int8-dynamic", "int8-weight-only", or None (or "int8") for `pick_scheme`'s
    choice on the model's device, logged. Returns the scheme, also kept as `model.quantization`.
    The model then computes in inference only and can't be saved (`save_pretrained` writes
    float weights: save before quantizing, quantize again at load time).
    """
    if getattr(model, "quantization", None) is not None:
        raise ConfigError(f"the model is already quantized ({model.quantization}); load it again instead")
    device, dtype = model.wte.weight.device, model.wte.weight.dtype
    if scheme is None or scheme == "int8":
        scheme, why = pick_scheme(device, dtype)
        log.info("int8: %s (%s)", scheme, why)
    if scheme not in SCHEMES:
        raise ConfigError(f"int8 scheme {scheme!r} is unknown; use one of {', '.join(SCHEMES)}")
    ao = _torchao()
    if scheme == "int8-dynamic":
        config = ao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    else:
        config = ao.Int8WeightOnlyConfig(set_inductor_config=False)
    wte = model.wte.weight
    head = nn.Linear(wte.shape[1], model.config.vocab_size, bias=False, device=device, dtype=wte.dtype)
    head.weight.copy_(wte[: model.config.vocab_size])
    model.lm_head = head
    with _quiet_torchao():
        ao.quantize_(model, config, filter_fn=_is_quantized, device=device)
    model.quantization = scheme
    model.eval()
    return scheme


@contextlib.contextmanager
def int8_export_form() -> Iterator[None]:
    """While a compiled step is traced: torchao's int8 x int8 products on CPU in their u8s8 form.

    torchao (0.18) chooses the form when the graph is traced: u8s8 (the activation shifted by
    128 into a new uint8 buffer, and a compensation term) on CPUs with VNNI and no AMX, s8s8
    on the others (AMX CPUs, CPUs without VNNI). In a one-row compiled step the s8s8
    activation reaches `torch._int_mm` as a (1, K) view with a row stride of 0 (inductor is
    free to choose the stride of a size-1 dimension), torch's CPU `_int_mm` passes that to
    oneDNN as lda=0, and oneDNN computes nothing: the step returns whatever its output buffer
    held, different garbage on every run, faster than memory allows. The u8s8 form writes
    the activation into a new buffer and gives the same int32 products: (a + 128) . b -
    128 * sum(b) = a . b, exact with VNNI or AMX; on AVX2 alone oneDNN saturates pairs of
    products in both forms alike (docs/numerics.md). Eager decoding is untouched: there
    the activation is a dense tensor and both forms are right.
    (torch < 2.12 has no u8s8 `_int_mm` on CPU; torchao keeps s8s8 there whatever this says.)
    """
    try:
        with _quiet_torchao():
            import torchao.kernel.intmm as intmm
    except ImportError:  # no torchao: no quantized model to trace
        yield
        return
    saved = intmm._cpu_is_amx_tile_supported, intmm._cpu_is_vnni_supported
    intmm._cpu_is_amx_tile_supported, intmm._cpu_is_vnni_supported = (lambda: False), (lambda: True)
    try:
        yield
    finally:
        intmm._cpu_is_amx_tile_supported, intmm._cpu_is_vnni_supported = saved


def _is_quantized(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and (name.startswith("h.") or name == "lm_head")


@contextlib.contextmanager
def _quiet_torchao():
    """torchao logs a warning for each CUDA-only extension a CPU build of torch can't load,
    and torch one for each of torchao's enums it registers (on import and on first use);
    neither concerns the int8 schemes used here."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        yield
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)


def _torchao():
    """torchao.quantization, or a ConfigError saying how to install it."""
    try:
        with _quiet_torchao():
            import torchao.quantization
    except ImportError:
        raise ConfigError("int8 quantization needs torchao: pip install 'torchao>=0.18'") from None
    return torchao.quantization
