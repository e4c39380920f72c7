"""Where a model runs and in which precision: the one place train, generate, eval and serve choose.

`auto` devices: a CUDA GPU when one is visible, else Apple's MPS, else the CPU, for every
command. `auto` dtype: bfloat16 where the hardware computes it natively, else float32:

- a CUDA GPU of compute capability 8.0 or newer (Ampere on), or a ROCm GPU with bf16;
- a CPU with AVX512-BF16 or AMX (x86) or the BF16 extension (Arm): without those
  instructions torch emulates bf16 and it runs slower than float32;
- Apple's MPS when it accepts bf16 (macOS 14 on).

The hardware probes (`cpu_bf16`, `cpu_int8`, `cuda_bf16`, `mps_bf16`, `cuda_available`,
`cuda_device_count`, `mps_available`) are plain functions, the only places that ask torch
about the machine. Every decision reads `device.type`, never the name, so `cuda:0` and
`cuda:1` are CUDA devices wherever `cuda` is.

>>> pick_device("cpu")
device(type='cpu')
>>> pick_dtype("float32", pick_device("cpu"))
torch.float32
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from gpt2kit.dtypes import DTYPE_CHOICES, DTYPE_NAMES
from gpt2kit.errors import ConfigError

# How to cap one machine's instruction set downwards (docs/numerics.md has what each switch
# reaches and what it misses). The variables are read when torch loads, so a level applies to
# a new process: `subprocess.run(..., env=os.environ | CPU_LEVELS["avx2"])`.
# - ATEN_CPU_CAPABILITY: torch's own kernels, and inductor's generated code (its vector ISA);
# - ONEDNN_MAX_CPU_ISA: oneDNN, which runs bf16 and int8 matrix products;
# - MKL_ENABLE_INSTRUCTIONS: MKL, which runs float32 matrix products (Intel CPUs only);
# - TORCHINDUCTOR_CPP_MARCH: the -march inductor compiles its C++ with (else -march=native,
#   and the compiler then uses AVX-512 in code the AVX2 level compiles).
# "avx512" caps AMX off for aten and oneDNN; inductor still uses AMX where the CPU has it
# (its only switches, ATEN_CPU_CAPABILITY=avx512 and cpp.simdlen=512, both pick AMX first).
CPU_LEVELS: dict[str, dict[str, str]] = {
    "native": {},
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "TORCHINDUCTOR_CPP_MARCH": "x86-64-v4",
    },
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3",
    },
}
# The CPU flags (`cpu_features()`) each level needs.
_LEVEL_NEEDS = {"native": (), "avx512": ("avx512_f", "avx512_bw", "avx512_vl"), "avx2": ("avx2", "fma3")}

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


# --- the hardware probes --------------------------------------------------------------------


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    return torch.cuda.device_count()


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


@functools.cache
def cpu_features() -> dict[str, Any]:
    """The CPU's instruction-set flags as torch sees them (`torch.cpu.get_capabilities()`)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return dict(get())
    # torch < 2.10: the private probes torch's own kernels dispatch on.
    avx512 = torch.cpu._is_avx512_supported()
    return {
        "avx2": torch.cpu._is_avx2_supported(),
        "fma3": torch.cpu._is_avx2_supported(),  # torch's AVX2 level needs FMA too
        **dict.fromkeys(("avx512_f", "avx512_bw", "avx512_vl"), avx512),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx_tile": torch.cpu._is_amx_tile_supported(),
        "avx512_vnni": torch.cpu._is_vnni_supported(),
    }


def usable_cpu_features() -> dict[str, Any]:
    """`cpu_features()` less what this process's CPU level (`CPU_LEVELS`) keeps torch's kernels
    from using: every AVX-512 and AMX flag when torch runs at its AVX2 (or lower) capability,
    AMX when oneDNN is capped below it. Choices made from these flags (the int8 scheme, the
    automatic dtype) then fit the kernels that will run: at the avx2 level of an AVX-512
    VNNI CPU, oneDNN's int8 products saturate pairs of products (docs/numerics.md), so the
    int8 x int8 scheme must not be picked there.
    """
    f = cpu_features()
    capability = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if capability in ("AVX2", "DEFAULT", "AVX") or not onednn.startswith(
        ("AVX512", "AVX10", "ALL", "DEFAULT")
    ):
        f = {k: v for k, v in f.items() if not k.startswith(("avx512", "amx"))}
    elif "AMX" not in onednn and onednn not in ("ALL", "DEFAULT"):
        f = {k: v for k, v in f.items() if not k.startswith("amx")}
    return f


def cpu_level_missing(level: str) -> str | None:
    """Why this CPU can't run at `level` (a `CPU_LEVELS` name), in words; None when it can.

    >>> cpu_level_missing("native") is None
    True
    """
    if level not in CPU_LEVELS:
        raise ConfigError(f"unknown CPU level {level!r}; use one of {', '.join(CPU_LEVELS)}")
    f = cpu_features()
    missing = [flag for flag in _LEVEL_NEEDS[level] if not f.get(flag)]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def cpu_bf16() -> str | None:
    """The CPU's native bf16 instructions (e.g. "AVX512-BF16"), or None when it has none
    or this process's CPU level caps them off (`usable_cpu_features`)."""
    f = usable_cpu_features()
    if f.get("amx_bf16") or f.get("amx_tile"):
        return "AMX"
    if f.get("avx512_bf16"):
        return "AVX512-BF16"
    if f.get("bf16") or f.get("sve_bf16"):
        return "Arm BF16"
    return None


def cpu_int8() -> str | None:
    """The CPU's int8 dot-product instructions (e.g. "AVX512-VNNI"), or None when it has none
    or this process's CPU level caps them off (`usable_cpu_features`)."""
    f = usable_cpu_features()
    if f.get("amx_int8"):
        return "AMX-INT8"
    if f.get("avx512_vnni"):
        return "AVX512-VNNI"
    if f.get("avx_vnni"):
        return "AVX-VNNI"
    if f.get("i8mm") or f.get("dot"):
        return "Arm dot product"
    return None


def cuda_bf16(device: torch.device) -> str | None:
    """ "CUDA bf16" when this GPU computes bf16 natively (not emulated), else None."""
    with torch.cuda.device(device):
        return "CUDA bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else None


def mps_bf16() -> str | None:
    try:
        torch.ones(2, 2, dtype=torch.bfloat16, device="mps") @ torch.ones(
            2, 2, dtype=torch.bfloat16, device="mps"
        )
    except (RuntimeError, TypeError):
        return None
    return "MPS bf16"


# --- the choices ------------------------------------------------------------------------------


def pick_device(name: str = "auto", *, local_rank: int | None = None, flag: str = "--device") -> torch.device:
    """The device `name` names (cpu, cuda, cuda:N, mps, auto), checked usable here.

    `local_rank`: under torchrun, plain `cuda` becomes this process's GPU. `flag` is how the
    user gives the setting, for error messages: "--device", "--set device=", "device=".

    >>> pick_device("cpu")
    device(type='cpu')
    """
    said, fix = _setting(flag, name), _setting(flag, "cpu")
    if name == "auto":
        name = "cuda" if cuda_available() else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{said}: unknown device; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        _check_cuda(device, said, fix)
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    elif device.type == "mps" and not mps_available():
        raise ConfigError(f"{said}: MPS is not available here (Apple GPUs only); use {fix}")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{said}: gpt2kit runs on cpu, cuda or mps; use one of those or auto")
    return device


def _check_cuda(device: torch.device, said: str, fix: str) -> None:
    if not cuda_available():
        if torch.version.cuda is None and torch.version.hip is None:
            raise ConfigError(
                f"{said}: this torch has no CUDA (torch.cuda.is_available() is False); "
                f"use {fix} or install a CUDA build of torch"
            )
        raise ConfigError(
            f"{said}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
            f"check the driver and CUDA_VISIBLE_DEVICES, or use {fix}"
        )
    count = cuda_device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{said}: there are {count} CUDA GPUs (cuda:0 to cuda:{count - 1})")


def native_bf16(device: torch.device | str) -> str | None:
    """What makes bf16 native on `device` ("AVX512-BF16", "CUDA bf16", ...), or None.

    Every CUDA device of a type is asked the same way, so `cuda:0` gets what `cuda` gets.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_bf16(device)
    if device.type == "mps":
        return mps_bf16()
    if device.type == "cpu":
        return cpu_bf16()
    return None


def auto_dtype(device: torch.device | str, *, training: bool = False) -> tuple[torch.dtype, str]:
    """bfloat16 where `device` computes it natively, else float32, with the reason in words.

    `training=True` asks for training's autocast dtype: the same, except float32 on MPS,
    where bf16 training is unmeasured (inference there uses bf16 where it works).

    >>> auto_dtype("cpu")  # doctest: +SKIP
    (torch.bfloat16, 'this CPU has AVX512-BF16')
    """
    device = torch.device(device)
    where = "this CPU" if device.type == "cpu" else f"{device}"
    if training and device.type == "mps":
        return torch.float32, "bf16 training on MPS is unmeasured"
    feature = native_bf16(device)
    if feature is not None:
        return torch.bfloat16, f"{where} has {feature}"
    if device.type == "cpu":
        return torch.float32, "this CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16)"
    return torch.float32, f"{where} has no native bf16"


def pick_dtype(name: str | torch.dtype, device: torch.device | str, *, flag: str = "--dtype") -> torch.dtype:
    """A dtype given by name (float32, bfloat16, float16, or auto: see `auto_dtype`) or as a
    floating-point torch dtype (float64 too, for reference computations).

    >>> pick_dtype("bfloat16", "cpu")
    torch.bfloat16
    """
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise ConfigError(
                f"{_setting(flag, name)}: a model computes in a floating-point dtype, e.g. float32"
            )
        return name
    if name == "auto":
        return auto_dtype(device)[0]
    if name not in DTYPES:
        raise ConfigError(f"{_setting(flag, name)}: unknown dtype; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def _setting(flag: str, value: object) -> str:
    """How the user wrote a setting: "--device cuda" for a flag, "device=cuda" for a keyword."""
    return f"{flag}{value}" if flag.endswith("=") else f"{flag} {value}"
