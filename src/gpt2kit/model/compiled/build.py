"""Building a compiled step: `GPT2.decode_step` exported with `torch.export` and compiled by
AOTInductor into one shared library, the weights frozen inside, packed for its GEMM kernels.

What one step serves: up to `slots` rows (the batch is a dynamic dimension: any 1..slots)
and any cache length up to the context (also dynamic). What a build costs: minutes for
gpt2 124M on 2 cores, a C++ compiler and Python's headers (`missing_toolchain` says what
is missing). `build_library` only builds; `get.py` checks the result and saves it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sysconfig
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from gpt2kit.errors import ConfigError
from gpt2kit.model.compiled.runtime import LENGTH_BUCKET
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.model.quantize import int8_export_form

log = logging.getLogger(__name__)


class StepGraph(nn.Module):
    """`decode_step` over the first `n` positions of each cache, n = `span.shape[0]`: a size
    taken as an input, so one traced graph serves every length (and every batch size).

    Tracing must know whether the part of the cache read is all of it (a contiguous view)
    or not, so the graph is traced for n < L; the one call that needs all L positions
    runs eagerly (`CompiledStep.__call__`).
    """

    def __init__(self, model: GPT2) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, idx: Tensor, input_pos: Tensor, k_cache: list[Tensor], v_cache: list[Tensor], span: Tensor
    ) -> Tensor:
        n = span.shape[0]
        torch._check(n < k_cache[0].shape[2])
        # The whole caches go in, so the new keys and values are written into the step's
        # inputs themselves (in place); the attention reads their first n positions.
        return self.model.decode_step(idx, input_pos, k_cache, v_cache, span=n)


def build_library(model: GPT2, slots: int, folder: Path, phase: Callable[[str], None]) -> Path:
    """Export and compile the step for `slots` rows; returns its library, written in `folder`.
    Raises ConfigError (one line) when the toolchain is missing or the compile fails."""
    device = model.wte.weight.device
    problem = missing_toolchain(device)
    if problem:
        raise ConfigError(problem)
    # Traced outside inference mode (export refuses inference tensors as graph inputs), in
    # eval mode (no dropout).
    with torch.inference_mode(False), torch.no_grad(), evaluating(model):
        try:
            phase(f"exporting the decode step ({slots} slots)")
            with _quiet():
                program = _export(model, slots)
            phase("compiling the decode step with AOTInductor (minutes, once per model and machine)")
            with _quiet(), _general_int8_gemm(model):
                package = torch._inductor.aoti_compile_and_package(
                    program, package_path=str(folder / "step.pt2"), inductor_configs=_options(device, model)
                )
        except Exception as e:
            raise ConfigError(
                f"building the compiled decode step failed: {first_line(e)[:300]}; run without "
                "compiling, or see the log (gpt2kit.model.compiled at DEBUG) for the compiler's output"
            ) from e
    with zipfile.ZipFile(package) as z:
        names = [n for n in z.namelist() if n.endswith(".so")]
        if len(names) != 1:
            raise ConfigError(
                f"the compiled package holds {len(names)} libraries, expected 1; please report this"
            )
        library = folder / "step.so"
        with z.open(names[0]) as src, open(library, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    return library


def load_library(library: Path, device: torch.device):
    """The AOTInductor runner of a step library (what `torch._export.aot_load` makes)."""
    if device.type == "cuda":
        return torch._C._aoti.AOTIModelContainerRunnerCuda(str(library), 1, str(device))
    return torch._C._aoti.AOTIModelContainerRunnerCpu(str(library), 1)


def _export(model: GPT2, slots: int) -> torch.export.ExportedProgram:
    config = model.config
    device, dtype = model.wte.weight.device, model.wte.weight.dtype
    P = config.n_positions
    # Example sizes: also the sizes the matrix products are tuned for.
    b = min(slots, 8)
    L = min(P, 2 * LENGTH_BUCKET)
    shape = (b, config.n_head, L, config.head_size)
    k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
    v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
    idx = torch.zeros(b, 1, dtype=torch.long, device=device)
    input_pos = torch.arange(b, device=device)
    span = torch.empty(L - 1, 0, device=device)
    rows = torch.export.Dim("rows", min=1, max=slots) if slots > 1 else None
    length = torch.export.Dim("length", min=3, max=P)
    cache = {0: rows, 2: length} if rows is not None else {2: length}
    row = {0: rows} if rows is not None else None
    dynamic = (
        row,
        row,
        [cache] * config.n_layer,
        [cache] * config.n_layer,
        {0: torch.export.Dim("span", min=2, max=P - 1)},
    )
    # int8-dynamic on an AMX CPU traced a form that a one-row step gets wrong (see int8_export_form).
    with int8_export_form():
        return torch.export.export(StepGraph(model), (idx, input_pos, k, v, span), dynamic_shapes=dynamic)


def _options(device: torch.device, model: GPT2) -> dict:
    options = {
        # Weights become constants of the step, packed for its GEMM kernels.
        "freezing": True,
        "max_autotune": True,
        "aot_inductor.package_constants_in_so": True,
    }
    if device.type == "cpu":
        options["max_autotune_gemm_backends"] = "CPP,ATEN"  # the C++ template, or MKL where faster
        if getattr(model, "quantization", None) == "int8-weight-only":
            # Its int8 products in the C++ template only: autotuning against ATen's kernel
            # picked ATen for some layers in some builds, and ATen's kernel reads the weights
            # at 12 GB/s (gpt2 124M bf16 + int8: 95 tokens/s all ATen, 132 mixed, 228 all CPP).
            options["max_autotune_gemm_backends"] = "CPP"
    else:
        options["aot_inductor.embed_kernel_binary"] = True  # one file: kernels inside the library
    return options


def missing_toolchain(device: torch.device | str = "cpu") -> str | None:
    """Why a compiled step can't be built here, as one line naming the fix; None when it can."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"compiled decoding runs on CPU and CUDA, not {device.type}; run without compiling"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:
        return (
            "building a compiled step needs a C++ compiler and none was found: install g++ "
            "(Debian/Ubuntu: apt install g++) or point CXX at one, or run without compiling"
        )
    header = python_header()
    if not header.is_file():
        return (
            f"building a compiled step needs Python's headers and {header} is missing: "
            "install them (Debian/Ubuntu: apt install python3-dev), or run without compiling"
        )
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return (
                "building a compiled step on CUDA needs triton: pip install triton, or run without compiling"
            )
    return None


def python_header() -> Path:
    """Where this Python's `Python.h` should be (inductor compiles against it)."""
    return Path(sysconfig.get_path("include") or ".") / "Python.h"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep inductor's autotuning tables and warnings off the terminal; log them at DEBUG."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    finally:
        if out.getvalue():
            log.debug("%s", out.getvalue())


@contextlib.contextmanager
def _general_int8_gemm(model: nn.Module) -> Iterator[None]:
    """For a weight-only int8 model, inductor's general C++ GEMM template for every layer.

    Inductor gives an int8 x bf16 product with few rows, and N and K multiples of its
    blocking, a variant of the template of its own ("small M"): every gpt2 layer gets it,
    the lm_head (N = 50257) does not. Measured on the one-row step of gpt2 124M
    (benchmarks/README.md, "int8: the general template for every layer"): the layers read
    their weights at 22-27 GB/s with the variant and 29-34 GB/s with the general template,
    at the avx2 and native levels. The variant is picked by one predicate in two inductor
    modules; it is answered False for the build, and put back after. A torch without that
    predicate builds as it would anyway."""
    if getattr(model, "quantization", None) != "int8-weight-only":
        yield
        return
    import torch._inductor.select_algorithm  # noqa: F401  (the template modules import it first)
    from torch._inductor.codegen import cpp_gemm_template, cpp_micro_gemm

    name = "is_int8_woq_gemm_small_m_dim_corner_case"
    modules = [m for m in (cpp_micro_gemm, cpp_gemm_template) if hasattr(m, name)]
    saved = [getattr(m, name) for m in modules]
    for m in modules:
        setattr(m, name, _never)
    try:
        yield
    finally:
        for m, f in zip(modules, saved, strict=True):
            setattr(m, name, f)


def _never(*args: object, **kwargs: object) -> bool:
    return False


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Trace in eval mode (no dropout), and give the model back in the mode it was in."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
