"""Where compiled decode steps are kept, and the key that says which one fits a model here.

A step is a shared library with the model's weights inside, so it fits one model (config,
dtype, quantization, the weights' values), one torch build, one device (CPU model, flags
and thread count, or GPU name) and the code it was traced from. The key is a hash of all
of that; a step is only ever looked up under its key, so one built for other weights,
another torch or another machine is never loaded.

Layout, in `<cache_dir()>/compiled/`: `<key>-s<slots>.so` (the step, for up to `slots`
rows), `<key>-s<slots>.json` (its record: what it was built for, the file's size and
CRC-32), `<key>-s<slots>.lock` (held while building) and `<key>-s<slots>.failed` (a build
here failed its check against the eager model: why, so it isn't built again). The library and then the record
are each written atomically (`gpt2kit.atomic`), and a step counts only when its file
matches its record: a crash mid-save, a truncated copy or a damaged file reads as missing.
Deleting the folder is always safe.

>>> steps_folder(Path("/tmp/cache"))
PosixPath('/tmp/cache/compiled')
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import mmap
import os
import platform
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

from gpt2kit.atomic import atomic_path, write_text

log = logging.getLogger(__name__)

CACHE_ENV = "GPT2KIT_CACHE_DIR"
# Bump when what a step file holds changes in a way the code hash can't see.
FORMAT = 1


def cache_dir() -> Path:
    """`$GPT2KIT_CACHE_DIR`, else `$XDG_CACHE_HOME/gpt2kit`, else `~/.cache/gpt2kit`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "gpt2kit"


# --- the key ----------------------------------------------------------------------------


def describe(model: nn.Module, *, code_files: tuple[str, ...] = ()) -> dict:
    """Everything a built step depends on, as JSON-ready values (the key hashes this)."""
    config = getattr(model, "config", None)
    weight = next(model.parameters())
    return {
        "format": FORMAT,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
        "dtype": str(weight.dtype),
        "quantization": getattr(model, "quantization", None),
        # Quantized layers show up as their module classes and their weights' types.
        "modules": sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()}),
        "weights": weights_digest(model),
        "code": code_digest(model, code_files),
        "versions": versions(model),
        "device": device_description(weight.device),
    }


def key_of(description: dict) -> str:
    """A short stable name for a description."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer: names, types, dtypes, shapes and bytes.

    Tensor subclasses (torchao's quantized weights) are hashed through their inner tensors.
    About 0.3 s for gpt2 (124M) in fp32. Works under `torch.inference_mode()` too.
    """
    h = hashlib.sha256()
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    with torch.no_grad():
        for name, t in sorted(named, key=lambda item: item[0]):
            h.update(name.encode())
            _hash_tensor(h, t)
    return h.hexdigest()


def _hash_tensor(h: hashlib._Hash, t: Tensor) -> None:
    h.update(f"{type(t).__qualname__} {t.dtype} {tuple(t.shape)}".encode())
    if type(t) not in (Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        # Flattened, not detached: torchao's detach of a subclass sets a version counter,
        # which an inference tensor refuses ("Cannot set version_counter for inference tensor").
        attrs, ctx = t.__tensor_flatten__()
        h.update(repr(ctx).encode())
        for attr in attrs:
            _hash_tensor(h, getattr(t, attr))
        return
    data = t.detach() if t.requires_grad else t  # plain tensors: no autograd, just bytes
    h.update(data.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)


def code_digest(model: nn.Module, extra_files: tuple[str, ...] = ()) -> str:
    """SHA-256 of the source the step was traced from: gpt2kit's modules in `model`, and more."""
    files = {
        sys.modules[type(m).__module__].__file__
        for m in model.modules()
        if type(m).__module__.partition(".")[0] == "gpt2kit"
    }
    h = hashlib.sha256()
    for path in sorted({*files, *extra_files} - {None}):
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def versions(model: nn.Module) -> dict:
    """torch's build (the step links to its C ABI), and that of any other package whose
    modules or tensor types the model holds (torchao's quantized weights)."""
    tensors = [*model.parameters(), *model.buffers()]
    types = {type(m) for m in model.modules()} | {type(t) for t in tensors}
    packages = {t.__module__.partition(".")[0] for t in types} - {"torch", "gpt2kit", "builtins"}
    out = {"torch": torch.__version__}
    for package in sorted(packages):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "?"
    return out


def device_description(device: torch.device) -> dict:
    """The device as generated code sees it: CPU ISA, model and threads, or the GPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "capability": list(torch.cuda.get_device_capability(index)),
            "cuda": torch.version.cuda,
        }
    # CPU code is generated for the ISA of the machine that built it (AVX-512, BF16, VNNI),
    # and its matrix products are split for that machine's thread count and caches.
    name, flags = _cpuinfo()
    return {
        "type": device.type,
        "machine": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": name,
        "flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
        "threads": torch.get_num_threads(),
        # What inductor generates code for: its vector ISA (AMX on an AMX CPU even at the
        # "avx512" level, docs/numerics.md) and the -march it compiles with.
        "inductor_isa": _inductor_isa(),
        "march": os.environ.get("TORCHINDUCTOR_CPP_MARCH", "native"),
    }


def _inductor_isa() -> str:
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:  # an older torch: the capability above stands for it
        return "?"
    try:
        return str(pick_vec_isa())
    except Exception:  # it test-compiles each ISA: with no working C++ compiler nothing is built here
        return "none (no C++ compiler)"


def _cpuinfo() -> tuple[str, list[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo; elsewhere the processor name."""
    name, flags = platform.processor(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        field, _, value = line.partition(":")
        field = field.strip()
        if field == "model name":
            name = value.strip()
        elif field in ("flags", "Features"):
            flags = value.split()
        elif not field and flags:  # the end of the first CPU's block
            break
    return name, flags


# --- the files --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One saved step: `<key>-s<slots>` in `folder`."""

    folder: Path
    key: str
    slots: int

    @property
    def stem(self) -> str:
        return f"{self.key}-s{self.slots}"

    @property
    def library(self) -> Path:
        return self.folder / f"{self.stem}.so"

    @property
    def record(self) -> Path:
        return self.folder / f"{self.stem}.json"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.stem}.lock"

    @property
    def failed(self) -> Path:
        return self.folder / f"{self.stem}.failed"


def steps_folder(root: Path | None = None) -> Path:
    return (root if root is not None else cache_dir()) / "compiled"


def find(folder: Path, key: str, slots: int, *, exact: bool = False) -> Entry | None:
    """The saved step with the fewest slots >= `slots` (with `exact`: == `slots`) whose file
    checks out; others with damaged files are removed on the way."""
    candidates = []
    for record in folder.glob(f"{key}-s*.json"):
        suffix = record.stem[len(key) + 2 :]
        if suffix.isdigit() and (int(suffix) == slots if exact else int(suffix) >= slots):
            candidates.append(Entry(folder, key, int(suffix)))
    for entry in sorted(candidates, key=lambda e: e.slots):
        if check(entry):
            return entry
        log.warning("compiled step %s is damaged or incomplete; removing it", entry.library)
        remove(entry)
    return None


def check(entry: Entry) -> bool:
    """Whether `entry`'s library exists and matches the size and CRC-32 in its record."""
    try:
        record = json.loads(entry.record.read_text())
        size = entry.library.stat().st_size
        if record.get("format") != FORMAT or size != record["size"] or size == 0:
            return False
        with open(entry.library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return zlib.crc32(m) == record["crc32"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def save(entry: Entry, library: BinaryIO, record: dict) -> None:
    """Write the library read from `library` into place, then its record (each atomically):
    the record last, so a step is never found before its file is complete."""
    crc = 0
    with atomic_path(entry.library) as tmp, open(tmp, "wb") as f:
        while chunk := library.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
            f.write(chunk)
    size = entry.library.stat().st_size
    write_text(entry.record, json.dumps({**record, "format": FORMAT, "size": size, "crc32": crc}, indent=1))


def remove(entry: Entry) -> None:
    """Delete `entry`'s record and then its library (missing files are fine)."""
    for path in (entry.record, entry.library):
        with contextlib.suppress(OSError):
            path.unlink()


def mark_failed(entry: Entry, reason: str) -> None:
    """Remember that `entry` was built here and failed its check (`reason`, one line): the
    same compiler on the same machine would build the same step, so it isn't built again."""
    entry.folder.mkdir(parents=True, exist_ok=True)
    write_text(entry.failed, reason + "\n")


def failure(entry: Entry) -> str | None:
    """Why `entry` failed its check when it was built here, or None."""
    try:
        return entry.failed.read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def locked(entry: Entry) -> Iterator[None]:
    """Hold `entry`'s lock file: one process builds a step while the others wait for it.

    Where `fcntl` is missing (Windows) nothing is held; saving stays atomic, so two builds
    at once still leave one whole step.
    """
    entry.folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(entry.lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
