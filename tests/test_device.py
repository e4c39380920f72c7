"""gpt2kit.device: one choice of device and dtype for every command.

The hardware probes (`cuda_available`, `cuda_device_count`, `mps_available`, `cpu_bf16`,
`cuda_bf16`, `mps_bf16`, `cpu_features`) are faked at their function boundary, so each rule is checked whatever
machine runs the tests; torch itself is never mocked.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2kit.device as dev
from gpt2kit.errors import ConfigError


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """machine(cuda=..., gpus=..., mps=..., cpu_bf16=..., cuda_bf16=..., mps_bf16=...) sets what
    the probes say (`gpus`: how many CUDA devices; default 1 with cuda, else 0)."""

    def fake(*, cuda=False, gpus=None, mps=False, cpu_bf16=None, cuda_bf16=None, mps_bf16=None) -> None:
        count = (1 if cuda else 0) if gpus is None else gpus
        monkeypatch.setattr(dev, "cuda_available", lambda: cuda)
        monkeypatch.setattr(dev, "cuda_device_count", lambda: count)
        monkeypatch.setattr(dev, "mps_available", lambda: mps)
        monkeypatch.setattr(dev, "cpu_bf16", lambda: cpu_bf16)
        monkeypatch.setattr(dev, "cuda_bf16", lambda device: cuda_bf16)
        monkeypatch.setattr(dev, "mps_bf16", lambda: mps_bf16)

    return fake


# --- devices ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_device_is_cuda_then_mps_then_cpu(machine, cuda: bool, mps: bool, expected: str) -> None:
    machine(cuda=cuda, mps=mps)
    assert dev.pick_device("auto") == torch.device(expected)
    assert dev.pick_device() == torch.device(expected)


def test_every_command_picks_its_device_with_the_one_function() -> None:
    # generate, serve and eval decide through cli._common.pick; train and the quick start call
    # pick_device themselves: the same function, so `auto` (MPS included) means one thing.
    import gpt2kit.cli.eval
    import gpt2kit.cli.generate
    import gpt2kit.cli.serve
    import gpt2kit.training.quickstart
    import gpt2kit.training.run

    assert gpt2kit.training.run.pick_device is dev.pick_device
    assert gpt2kit.training.quickstart.pick_device is dev.pick_device
    for module in (gpt2kit.cli.generate, gpt2kit.cli.serve, gpt2kit.cli.eval):
        assert not hasattr(module, "pick_device") and not hasattr(module, "pick_dtype"), module


def test_cuda_n_is_a_cuda_device_checked_against_the_gpus_there(machine) -> None:
    machine(cuda=True, gpus=2)
    for name in ("cuda:0", "cuda:1"):
        assert dev.pick_device(name) == torch.device(name)
        assert dev.pick_device(name, local_rank=1) == torch.device(name), "an explicit index wins"
    with pytest.raises(ConfigError, match=r"--device cuda:2: there are 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        dev.pick_device("cuda:2")
    machine(cuda=True, gpus=1)
    with pytest.raises(ConfigError, match="there are 1 CUDA GPUs"):
        dev.pick_device("cuda:1")


def test_torchrun_puts_plain_cuda_on_the_local_gpu(machine) -> None:
    machine(cuda=True)
    assert dev.pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert dev.pick_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert dev.pick_device("cuda") == torch.device("cuda")
    assert dev.pick_device("cpu", local_rank=1) == torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "flag", "fragments"),
    [
        ("foo", "--device", ["--device foo: unknown device", "use cpu, cuda, cuda:N, mps or auto"]),
        ("cuda", "--device", ["--device cuda: ", "use --device cpu"]),
        ("cuda:3", "--set device=", ["--set device=cuda:3: ", "use --set device=cpu"]),
        ("mps", "device=", ["device=mps: MPS is not available here", "use device=cpu"]),
        ("meta", "--device", ["--device meta: gpt2kit runs on cpu, cuda or mps"]),
    ],
)
def test_unusable_devices_are_one_line_errors(machine, name: str, flag: str, fragments: list[str]) -> None:
    machine(cuda=False, mps=False)
    with pytest.raises(ConfigError) as e:
        dev.pick_device(name, flag=flag)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# --- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("native", ["CUDA bf16", None])
def test_cuda_index_gets_what_cuda_gets(machine, native: str | None) -> None:
    machine(cuda=True, cuda_bf16=native)
    expected = torch.bfloat16 if native else torch.float32
    for name in ("cuda", "cuda:0", "cuda:1"):
        assert dev.pick_dtype("auto", torch.device(name)) == expected, name
        assert dev.pick_dtype("auto", name) == expected, name


@pytest.mark.parametrize("native", ["CUDA bf16", None])
def test_the_cli_picks_for_cuda_n_what_it_picks_for_cuda(machine, native: str | None) -> None:
    """generate, serve and eval decide through cli._common.pick: --device cuda:0 gets bf16
    where cuda does (it got float32 when the rule compared the name with "cuda")."""
    import argparse

    from gpt2kit.cli._common import pick

    machine(cuda=True, gpus=2, cuda_bf16=native)
    picked = {}
    for name in ("cuda", "cuda:0", "cuda:1"):
        args = argparse.Namespace(device=name, dtype="auto", quantize="int8", command="serve", compile=None)
        p = pick(args)
        assert p.device == torch.device(name)
        picked[name] = (p.dtype, p.quantize, tuple(n.replace(f"({name} has", "(GPU has") for n in p.notes))
    assert picked["cuda:0"] == picked["cuda:1"] == picked["cuda"], picked
    dtype, quantize, notes = picked["cuda"]
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert quantize == "int8-weight-only"  # the dynamic scheme is for CPUs
    assert notes[0].startswith(f"[dtype auto: {'bfloat16' if native else 'float32'} (GPU has ")


def test_auto_dtype_on_a_cpu_follows_its_bf16_instructions(machine) -> None:
    machine(cpu_bf16=None)
    assert dev.pick_dtype("auto", "cpu") == torch.float32
    dtype, why = dev.auto_dtype("cpu")
    assert dtype == torch.float32 and "no native bf16" in why
    machine(cpu_bf16="AVX512-BF16")
    assert dev.pick_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert dev.auto_dtype("cpu") == (torch.bfloat16, "this CPU has AVX512-BF16")


def test_mps_gets_bf16_only_where_it_accepts_it(machine) -> None:
    machine(mps=True, mps_bf16=None)
    assert dev.pick_dtype("auto", "mps") == torch.float32
    machine(mps=True, mps_bf16="MPS bf16")
    assert dev.pick_dtype("auto", "mps") == torch.bfloat16


def test_training_stays_float32_on_mps_where_inference_gets_bf16(machine) -> None:
    machine(mps=True, mps_bf16="MPS bf16")
    assert dev.auto_dtype("mps")[0] == torch.bfloat16
    assert dev.auto_dtype("mps", training=True)[0] == torch.float32
    machine(cpu_bf16="AVX512-BF16")
    assert dev.auto_dtype("cpu", training=True) == dev.auto_dtype("cpu")


def test_named_dtypes_ignore_the_hardware(machine) -> None:
    machine(cpu_bf16=None)
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        assert dev.pick_dtype(name, "cpu") == dtype
        assert dev.pick_dtype(dtype, "cpu") == dtype
    assert dev.pick_dtype(torch.float64, "cpu") == torch.float64  # reference computations


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("float64", "--dtype float64: unknown dtype; use one of auto, float32, bfloat16, float16"),
        ("fp32", "--dtype fp32: unknown dtype"),
        (torch.int8, "--dtype torch.int8: a model computes in a floating-point dtype"),
        (torch.int64, "--dtype torch.int64: a model computes in a floating-point dtype"),
    ],
)
def test_bad_dtypes_are_one_line_errors(value, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        dev.pick_dtype(value, "cpu")


# --- the CPU probes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("features", "bf16", "int8"),
    [
        ({"avx512_bf16": True, "avx512_vnni": True}, "AVX512-BF16", "AVX512-VNNI"),
        ({"amx_tile": True, "amx_bf16": True, "amx_int8": True, "avx512_bf16": True}, "AMX", "AMX-INT8"),
        ({"avx512_vnni": True}, None, "AVX512-VNNI"),  # Cascade Lake: int8 dot products, no bf16
        ({"avx_vnni": True}, None, "AVX-VNNI"),
        ({"avx2": True}, None, None),
        ({"architecture": "aarch64", "bf16": True, "i8mm": True}, "Arm BF16", "Arm dot product"),
        ({}, None, None),
    ],
)
def test_cpu_probes_read_the_instruction_set_flags(
    monkeypatch: pytest.MonkeyPatch, features: dict, bf16: str | None, int8: str | None
) -> None:
    monkeypatch.setattr(dev, "cpu_features", lambda: features)
    assert dev.cpu_bf16() == bf16
    assert dev.cpu_int8() == int8


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="reads Linux x86 CPU flags"
)
def test_cpu_probes_agree_with_the_kernel() -> None:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert (dev.cpu_bf16() is not None) == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert (dev.cpu_int8() is not None) == bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def test_no_module_asks_torch_for_the_device_or_compares_device_names() -> None:
    """The probes above are the only places that ask torch about the machine, and every
    decision reads `device.type`: a name compared with "cuda" gave `cuda:0` float32 once."""
    import re

    package = Path(dev.__file__).parent
    asks = re.compile(r"torch\.cuda\.is_available\(\)|torch\.backends\.mps\.is_available\(\)")
    compares = re.compile(r"""(device|name)\s*[!=]=\s*["'](cuda|mps|cpu)["']""")
    found = [
        f"{path.relative_to(package)}:{n}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path != Path(dev.__file__)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if asks.search(line) or compares.search(line)
    ]
    assert not found, found


@pytest.mark.parametrize(
    ("capability", "onednn", "bf16", "int8"),
    [
        ("AVX512", None, "AMX", "AMX-INT8"),  # native
        ("AVX512", "AVX512_CORE_BF16", "AVX512-BF16", "AVX512-VNNI"),  # the avx512 level: AMX off
        ("AVX2", "AVX2", None, None),  # the avx2 level: no AVX-512, no AMX
        ("AVX512", "AVX2_VNNI", None, None),  # oneDNN alone capped to AVX2 (this CPU has no AVX-VNNI)
    ],
)
def test_the_cpu_level_caps_what_the_probes_report(
    monkeypatch: pytest.MonkeyPatch, capability: str, onednn: str | None, bf16: str | None, int8: str | None
) -> None:
    """A process capped to a level (`CPU_LEVELS`) reports what its kernels may use, so that
    `dtype="auto"` and the int8 scheme are chosen as on a CPU of that level."""
    sapphire_rapids = {"avx2": True, "avx512_f": True, "avx512_vnni": True, "avx512_bf16": True}
    sapphire_rapids |= {"amx_tile": True, "amx_bf16": True, "amx_int8": True}
    monkeypatch.setattr(dev, "cpu_features", lambda: sapphire_rapids)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if onednn is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
    assert dev.cpu_bf16() == bf16 and dev.cpu_int8() == int8
    assert dev.cpu_features() == sapphire_rapids  # the hardware itself is still reported as it is


def test_a_capped_child_process_picks_float32_and_weight_only() -> None:
    code = (
        "from gpt2kit.device import auto_dtype; from gpt2kit.model.quantize import pick_scheme; "
        "print(auto_dtype('cpu')[0], pick_scheme('cpu')[0])"
    )
    env = {**os.environ, **dev.CPU_LEVELS["avx2"]}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["torch.float32", "int8-weight-only"]
