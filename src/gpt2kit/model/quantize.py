"""Int8 quantization (opt-in: `quantize="int8"`, `--quantize int8`): int8 weights, one scale
per output channel.

Two schemes; `pick_scheme` chooses one for the hardware, `quantize_int8` applies it in place:

- "int8-weight-only": int8 weights, float activations, each Linear an `Int8Linear`. On CPU
  its product is ATen's weight-only kernel (`aten._weight_int8pack_mm`) with bfloat16
  activations, which reads the weights at near the memory bandwidth at batch 1; eager and
  compiled run the same kernel. Picked on every CPU level (AVX2, AVX-512, AMX) and on GPUs
  (there the weight is dequantized per call: unmeasured).
- "int8-dynamic": activations quantized per token at run time too, so the products are int8
  x int8 (`torch._int_mm`, which inductor turns into VNNI/AMX micro-kernels). torchao's
  `Int8DynamicActivationInt8WeightConfig`. Never picked since 2026-12-05: at batch 1 it is
  slower than weight-only (126.8 against 186.9 tokens/s compiled, gpt2 124M, AVX512-VNNI),
  eagerly it runs as separate ops (5.7 tokens/s), and on AVX2 alone oneDNN saturates its
  products (docs/numerics.md). Kept for those who measure it faster on their machine.

What is quantized: the four Linear layers of every block and the output projection. GPT-2
ties the output projection to the token embedding `wte`; quantizing gives it an untied int8
copy, `model.lm_head` (`GPT2.logits` uses it), and `wte` stays float for the lookups.
LayerNorms, biases and the position table stay float. The quality cost: perplexity
+0.02-0.05% (benchmarks/README.md).

>>> model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10, n_positions=8))
>>> quantize_int8(model, scheme="int8-weight-only")
'int8-weight-only'
>>> type(model.h[0].mlp.c_fc).__name__, model.h[0].mlp.c_fc.weight.dtype, model.lm_head.out_features
('Int8Linear', torch.int8, 10)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2kit.errors import ConfigError

log = logging.getLogger(__name__)

SCHEMES = ("int8-dynamic", "int8-weight-only")
METHODS = ("int8", *SCHEMES)  # what `quantize=` accepts: "int8" lets `pick_scheme` choose


def pick_scheme(device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """The int8 scheme for a model computing in `dtype` on `device`, and why, in words.

    Weight-only everywhere: on CPU, measured on gpt2 124M's decode step (benchmarks/README.md),
    its int8 x bfloat16 products are faster than int8 x int8 ones at batch 1, agree better
    between eager and compiled, and are right at every CPU level (int8 x int8 products
    saturate on AVX2 alone). `dtype` no longer changes the choice (it did while the dynamic
    scheme was picked for float32 on VNNI CPUs).

    >>> pick_scheme("cuda")
    ('int8-weight-only', 'the dynamic scheme is for CPUs with int8 dot products')
    """
    device = torch.device(device)
    if device.type != "cpu":
        return "int8-weight-only", "the dynamic scheme is for CPUs with int8 dot products"
    return "int8-weight-only", "int8 x bfloat16 products: the fastest int8 at batch 1, on every CPU level"


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
    wte = model.wte.weight
    head = nn.Linear(wte.shape[1], model.config.vocab_size, bias=False, device=device, dtype=wte.dtype)
    head.weight.copy_(wte[: model.config.vocab_size])
    model.lm_head = head
    if scheme == "int8-dynamic":
        ao = _torchao()
        config = ao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
        with _quiet_torchao():
            ao.quantize_(model, config, filter_fn=_is_quantized, device=device)
    else:
        for name, module in list(model.named_modules()):
            if _is_quantized(module, name):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, Int8Linear(module))
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


class Int8Linear(nn.Module):
    """A Linear with int8 weights, one scale per output channel: on CPU the product is
    `aten._weight_int8pack_mm` (ATen's weight-only op, gpt-fast's CPU int8 path) with the
    activations in bfloat16, whatever the model computes in; the output comes back in the
    model's dtype.

    Eagerly that op runs ATen's own kernel. In a compiled step inductor lowers the same op to
    its C++ GEMM template (int8 weights packed at build time, bfloat16 activations, float32
    sums; `compiled.build` allows only that backend for weight-only models), which reads the
    weights near the memory bandwidth: gpt2 124M decodes at 228 tokens/s against 70 eagerly
    and 95 with ATen's kernel compiled (benchmarks/README.md, "int8"). ATen's kernel is 6x
    slower still with float32 activations, hence bfloat16 ones everywhere.

    Why not torchao's weight-only tensor: it multiplies by the weight cast to float
    (`mm(x, w.to(dtype))`), which eagerly converts every weight on every call (9.5 tokens/s
    for gpt2 124M) and in a compiled step relies on inductor matching that pattern.

    The scales are rounded to bfloat16 first and the weights quantized against the rounded
    scales, so the kernel's bfloat16 scales are exact, not a second rounding. Elsewhere (CUDA,
    MPS) the product is `x @ (w * scale).T` in the model's dtype (unmeasured).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        amax = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        # Rounded up, so that no weight quantizes past 127.
        scale = _bf16_ceil(amax / 127)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A Parameter, as the float weight was: the model's parameter count stays the same.
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scale).to(x.dtype)
        else:
            y = F.linear(x2, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def _bf16_ceil(x: Tensor) -> Tensor:
    """`x` (float32, positive) rounded up to the next bfloat16 value, as float32."""
    b = x.to(torch.bfloat16).float()
    up = torch.nextafter(b.to(torch.bfloat16), torch.tensor(float("inf"), dtype=torch.bfloat16)).float()
    return torch.where(b >= x, b, up)


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
