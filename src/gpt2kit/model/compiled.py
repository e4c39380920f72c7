"""Compiled decode steps: `GPT2.decode_step` built ahead of time by AOTInductor, saved, and
loaded by later processes in about a second.

Why: a decode step reads every weight once per token, so its speed is the speed at which
its matrix products stream weights. Inductor, with the weights frozen into the step,
packs each one for its C++ GEMM template, fuses the small ops between the products into
a few C++ loops and runs the whole step without Python (benchmarks/README.md has the
figures against eager `decode_step` and transformers).

What one step serves: up to `slots` rows (the batch is a dynamic dimension: any 1..slots)
and any cache length up to the context (also dynamic). Each call attends over the
positions in use, rounded up to `LENGTH_BUCKET`, not over the whole cache.

What it costs: the first build of a step takes minutes (gpt2 124M: ~2-3 min on 2 cores)
and needs a C++ compiler and Python's headers (`missing_toolchain` says what is missing);
the step holds its own packed copy of the weights (memory, and disk in the cache). It is
saved in the step cache (`gpt2kit.model.stepcache`: where, and the key that ties it to the
weights' values, the dtype, quantization, slots, torch build and machine), and a later
`compiled_step` for the same model loads it in about a second.

>>> step = compiled_step(model, slots=8, max_len=1024, build=True)  # doctest: +SKIP
>>> logits = step(idx, input_pos, k_cache, v_cache)  # as model.decode_step  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import logging
import sysconfig
import tempfile
import time
import weakref
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from gpt2kit.errors import ConfigError
from gpt2kit.model import stepcache
from gpt2kit.model.gpt2 import GPT2, use_decode_layout
from gpt2kit.model.quantize import int8_export_form

log = logging.getLogger(__name__)

# Calls attend over the positions in use rounded up to this: less cache to read than the
# whole max_len, at most ~64 masked positions more than needed.
LENGTH_BUCKET = 64

Progress = Callable[[str], None]


class CompiledStep:
    """A loaded compiled step: `step(idx, input_pos, k_cache, v_cache)` as `GPT2.decode_step`.

    `idx` (b, 1) int64, `input_pos` (b,) int64, `k_cache[i]`/`v_cache[i]` (b, nh, L, hs)
    contiguous, in the model's dtype and on its device, 1 <= b <= `slots`, any L up to the
    context. Writes each row's key/value at its position in place and returns (b, V) logits.
    """

    def __init__(self, model: GPT2, runner, *, slots: int, max_len: int, library: Path) -> None:
        self.slots = slots
        self.max_len = max_len
        self.library = library
        self._model = weakref.ref(model)
        self._runner = runner
        self._weights = _weights_state(model)
        self._tensors = [*model.parameters(), *model.buffers()]
        self._versions = _versions(self._tensors)
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
        if _versions(self._tensors) != self._versions:
            raise ConfigError(
                "the model's weights changed after its compiled step was loaded (training, "
                "load_state_dict); get a step for the new weights with compiled_step(...)"
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
            # for a part of 2 or more positions (see _StepGraph): that call runs eagerly.
            return model.decode_step(idx, input_pos, k_cache, v_cache)
        if span not in self._spans:
            self._spans[span] = torch.empty(span, 0, device=idx.device)
        # The library reads its inputs as dense row-major memory: a strided view (a beam's
        # tokens, running[:, :, t]) would be read as other tokens.
        idx, input_pos = idx.contiguous(), input_pos.contiguous()
        return self._runner.run([idx, input_pos, *k_cache, *v_cache, self._spans[span]])[0]


# Steps loaded in this process, per model object: a second engine for the same model (each
# generate() call makes one) reuses the loaded step instead of hashing and loading again.
_LOADED: weakref.WeakKeyDictionary[nn.Module, list[CompiledStep]] = weakref.WeakKeyDictionary()


def compiled_step(
    model: GPT2,
    *,
    slots: int,
    max_len: int,
    build: bool,
    progress: Progress | None = None,
    cache_dir: str | Path | None = None,
    exact: bool = False,
) -> CompiledStep | None:
    """The compiled decode step for `model` on this machine, for up to `slots` rows.

    Loads the saved step (one with at least `slots` slots) for this model's weights, dtype,
    quantization, torch build and machine; when there is none, builds and saves it if
    `build`, else returns None. `max_len` is the cache length the caller allocates (any
    length up to the context works). `progress(message)` is called at each phase of a
    build (the library only logs); `cache_dir` overrides `stepcache.cache_dir()`. With
    `exact`, only a step for exactly `slots` rows will do.

    Raises ConfigError when a build is needed and fails (no C++ compiler, no Python
    headers, a failed compile): one line naming the fix. Callers that can run eagerly
    instead catch it, or ask `missing_toolchain()` first.
    """
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ConfigError(f"slots must be a positive integer, got {slots!r}")
    n_positions = model.config.n_positions
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 2 <= max_len <= n_positions:
        raise ConfigError(f"max_len must be an integer in [2, {n_positions}] (the context), got {max_len!r}")
    if n_positions < 3:
        raise ConfigError(
            f"compiled decoding needs a context of 3 positions or more, this model has {n_positions}"
        )
    device = model.wte.weight.device
    if device.type == "cpu":
        use_decode_layout(model)  # what the engine does anyway; done first so it isn't a change
    for step in sorted(_LOADED.get(model, []), key=lambda s: s.slots):  # the fewest slots that do
        if (step.slots == slots if exact else step.slots >= slots) and step._weights == _weights_state(model):
            return CompiledStep(model, step._runner, slots=step.slots, max_len=max_len, library=step.library)

    phase = _Phases(progress)
    folder = stepcache.steps_folder(Path(cache_dir) if cache_dir is not None else None)
    description = _describe(model)
    key = stepcache.key_of(description)
    for attempt in range(2):
        entry = stepcache.find(folder, key, slots, exact=exact)
        if entry is None:
            if not build:
                log.debug("no compiled step saved for key %s with %d slots in %s", key, slots, folder)
                return None
            entry = _build_locked(model, stepcache.Entry(folder, key, slots), description, phase, exact=exact)
        phase(f"loading the compiled step {entry.library}")
        try:
            runner = _load(entry.library, device)
        except RuntimeError as e:
            # The file matched its record yet doesn't load: never trust it again.
            log.warning("compiled step %s does not load (%s); removing it", entry.library, _first_line(e))
            stepcache.remove(entry)
            if attempt or not build:
                return None
            continue
        step = CompiledStep(model, runner, slots=entry.slots, max_len=max_len, library=entry.library)
        _LOADED.setdefault(model, []).append(step)
        phase.done()
        return step
    return None


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


def decode_step(
    model: GPT2, *, slots: int, max_len: int, build: bool, progress: Progress | None = None
) -> CompiledStep | TieredStep | None:
    """What the engine decodes `slots` rows with: `compiled_step(...)`, and for more than one
    slot also the one-row step, when saved (or built, with `build`). None when none is saved
    and `build` is False."""
    many = compiled_step(model, slots=slots, max_len=max_len, build=build, progress=progress)
    if many is None or many.slots == 1:
        return many
    one = compiled_step(model, slots=1, max_len=max_len, build=build, progress=progress, exact=True)
    return TieredStep(one, many) if one is not None else many


# The key of each model seen, with the weights' state it was computed for: generate() asks for
# a saved step on every call, and hashing gpt2's weights again each time would cost ~0.3 s.
_DESCRIBED: weakref.WeakKeyDictionary[nn.Module, tuple[list, dict]] = weakref.WeakKeyDictionary()


def _describe(model: GPT2) -> dict:
    state = _weights_state(model)
    seen = _DESCRIBED.get(model)
    if seen is not None and seen[0] == state:
        return seen[1]
    description = stepcache.describe(model, code_files=(__file__,))
    _DESCRIBED[model] = (state, description)
    return description


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


# --- building ---------------------------------------------------------------------------


class _StepGraph(nn.Module):
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
        k = [t[:, :, :n] for t in k_cache]  # (b, nh, n, hs)
        v = [t[:, :, :n] for t in v_cache]
        return self.model.decode_step(idx, input_pos, k, v)


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
        return torch.export.export(_StepGraph(model), (idx, input_pos, k, v, span), dynamic_shapes=dynamic)


def _inductor_options(device: torch.device) -> dict:
    options = {
        # Weights become constants of the step, packed for its GEMM kernels.
        "freezing": True,
        "max_autotune": True,
        "aot_inductor.package_constants_in_so": True,
    }
    if device.type == "cpu":
        options["max_autotune_gemm_backends"] = "CPP,ATEN"  # the C++ template, or MKL where faster
    else:
        options["aot_inductor.embed_kernel_binary"] = True  # one file: kernels inside the library
    return options


def _build_locked(
    model: GPT2, entry: stepcache.Entry, description: dict, phase: _Phases, *, exact: bool = False
) -> stepcache.Entry:
    """Build and save `entry`, unless another process saved it while this one waited."""
    problem = missing_toolchain(model.wte.weight.device)
    if problem:
        raise ConfigError(problem)
    with stepcache.locked(entry):
        found = stepcache.find(entry.folder, entry.key, entry.slots, exact=exact)
        if found is not None:
            return found
        _build(model, entry, description, phase)
    return entry


def _build(model: GPT2, entry: stepcache.Entry, description: dict, phase: _Phases) -> None:
    device = model.wte.weight.device
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpt2kit-step-") as tmp, _eval(model), torch.no_grad():
        try:
            phase(f"exporting the decode step ({entry.slots} slots)")
            with _quiet():
                program = _export(model, entry.slots)
            phase("compiling the decode step with AOTInductor (minutes, once per model and machine)")
            with _quiet():
                package = torch._inductor.aoti_compile_and_package(
                    program,
                    package_path=str(Path(tmp) / "step.pt2"),
                    inductor_configs=_inductor_options(device),
                )
        except Exception as e:
            raise ConfigError(
                f"building the compiled decode step failed: {_first_line(e)[:300]}; run without "
                "compiling, or see the log (gpt2kit.model.compiled at DEBUG) for the compiler's output"
            ) from e
        phase(f"saving the compiled step to {entry.library}")
        with zipfile.ZipFile(package) as z:
            names = [n for n in z.namelist() if n.endswith(".so")]
            if len(names) != 1:
                raise ConfigError(
                    f"the compiled package holds {len(names)} libraries, expected 1; please report this"
                )
            record = {
                "slots": entry.slots,
                "description": description,
                "build_seconds": round(time.perf_counter() - start, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            with z.open(names[0]) as library:
                stepcache.save(entry, library, record)


def _load(library: Path, device: torch.device):
    """The AOTInductor runner of a step library (what `torch._export.aot_load` makes)."""
    if device.type == "cuda":
        return torch._C._aoti.AOTIModelContainerRunnerCuda(str(library), 1, str(device))
    return torch._C._aoti.AOTIModelContainerRunnerCpu(str(library), 1)


def _weights_state(model: nn.Module) -> list:
    """Changes when a parameter or buffer is replaced or updated in place (it reads each
    tensor's identity and version counter, not its data)."""
    tensors = [*model.parameters(), *model.buffers()]
    return [id(t) for t in tensors] + _versions(tensors)


def _versions(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """Each tensor's version counter and data pointer: changes when it is updated in place
    or its data replaced (no data is read, so it is cheap enough for every step)."""
    out = []
    for t in tensors:
        try:
            version = t._version
        except RuntimeError:  # an inference tensor keeps no version counter
            version = -1
        try:
            pointer = t.data_ptr()
        except RuntimeError:  # a wrapper subclass (torchao's int8) has no storage of its own
            pointer = 0
        out.append((version, pointer))
    return out


class _Phases:
    """Logs each phase of a build with the time since the start, and tells `progress`."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        log.info("%s [%.1fs]", message, time.perf_counter() - self.start)
        if self.progress is not None:
            self.progress(message)

    def done(self) -> None:
        log.info("compiled step ready [%.1fs]", time.perf_counter() - self.start)


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
def _eval(model: nn.Module) -> Iterator[None]:
    """Trace in eval mode (no dropout), and give the model back in the mode it was in."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
