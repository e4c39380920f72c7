"""Training checkpoints: everything a run needs to continue bit-for-bit, written crash-safely.

    RUN_DIR/ckpt-000500/
        config.json, model.safetensors, vocab.json, merges.txt, ...   the model (save_pretrained format)
        trainer.safetensors   optimizer moments, torch RNG states (tensors, no pickles)
        trainer.json          step, train config, optimizer hyper-parameters, python/numpy RNG,
                              data position, best val loss
        manifest.json         size and sha256 of every file above, written last
    RUN_DIR/latest            "ckpt-000500", replaced atomically after the directory is in place
    RUN_DIR/best              the checkpoint with the lowest val loss

A checkpoint is assembled in a hidden temporary directory, every file fsynced, then renamed
into place, so a crash at any moment leaves the previous checkpoints intact. On load each
candidate is checked against its manifest; a damaged one is skipped with a warning.
FSDP training writes the same files: parallel.py gathers the full state onto rank 0 first.

>>> ckpt = latest_checkpoint("runs/shakespeare")  # doctest: +SKIP
>>> ckpt.step, ckpt.path.name
(500, 'ckpt-000500')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2kit import atomic
from gpt2kit.device import cuda_available, cuda_device_count
from gpt2kit.errors import CheckpointError
from gpt2kit.faults import pause_point
from gpt2kit.model.checkpoint import save_model
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.tokenizer.tokenizer import Tokenizer
from gpt2kit.training.optim import Optimizers

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^ckpt-(\d{6,})$")
MANIFEST = "manifest.json"


@dataclass
class RunCheckpoint:
    """A verified checkpoint directory and its trainer state."""

    path: Path
    step: int
    state: dict[str, Any]  # trainer.json

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / "trainer.safetensors")


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def write_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Create directory `target` atomically: `fill` a temporary sibling, fsync, rename.

    An existing `target` is replaced (moved aside first, so there is no moment without one).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crash
    tmp.mkdir()
    try:
        fill(tmp)
        _write_manifest(tmp)
        atomic.fsync_dir(tmp)
        old = target.parent / f".{target.name}.old"
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        atomic.fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    step: int,
    model: GPT2,
    tokenizer: Tokenizer | None,
    optimizer: Optimizers | dict[str, Any],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write RUN_DIR/ckpt-{step}, point `latest` (and `best`) at it, prune old ones.

    `optimizer` is the optimizer or its full `state_dict()` (parameters keyed by index, as
    FSDP training gathers it: parallel.py). `state` is JSON data (step, config, data position,
    best val loss ...); optimizer and RNG states are added here. Returns the checkpoint's path.
    """
    run_dir = Path(run_dir)
    opt = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # only a process that used CUDA has CUDA RNG states to keep
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    slots: dict[str, list[str]] = {}
    for idx, param_state in opt["state"].items():
        slots[str(idx)] = sorted(param_state)
        for name, value in param_state.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{idx}.{name}"] = value.detach().contiguous().cpu()
    np_state = np.random.get_state()
    full_state = {
        **state,
        "step": step,
        "optimizer": {"param_groups": opt["param_groups"], "slots": slots},
        "rng": {
            "python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        },
    }

    def fill(tmp: Path) -> None:
        save_model(model, tmp, tokenizer=tokenizer)
        pause_point("checkpoint.mid_write")
        with atomic.atomic_path(tmp / "trainer.safetensors") as f:
            save_file(tensors, f)
        atomic.write_text(tmp / "trainer.json", json.dumps(full_state, indent=1) + "\n")

    path = run_dir / ckpt_name(step)
    write_dir(path, fill)
    pause_point("checkpoint.renamed")
    atomic.write_text(run_dir / "latest", path.name + "\n")
    best = state.get("best_step")
    if best == step:
        atomic.write_text(run_dir / "best", path.name + "\n")
    prune(run_dir, keep_last=keep_last, keep=ckpt_name(best) if best is not None else None)
    log.debug("saved checkpoint %s", path)
    return path


def prune(run_dir: Path, *, keep_last: int, keep: str | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints (and `keep`, the best one)."""
    for path in checkpoint_dirs(run_dir)[keep_last:]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint directories, newest step first (temporary ones never match)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> RunCheckpoint | None:
    """The newest checkpoint that passes its manifest check; damaged ones are skipped with a warning."""
    for path in checkpoint_dirs(run_dir):
        problem = verify(path)
        if problem:
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path, problem)
            continue
        state = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        return RunCheckpoint(path, int(state["step"]), state)
    return None


def verify(path: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest.json: the write never finished"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"unreadable manifest.json ({e})"
    for name, info in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != info["size"]:
            return f"{name} has {size} bytes, the manifest says {info['size']}"
        if _sha256(file) != info["sha256"]:
            return f"{name} does not match its sha256 checksum"
    for required in ("model.safetensors", "trainer.json", "trainer.safetensors"):
        if required not in manifest.get("files", {}):
            return f"{required} is not in the manifest"
    return None


def optimizer_state(ckpt: RunCheckpoint) -> dict[str, Any]:
    """The saved optimizer as an `optimizer.state_dict()`: moments and hyper-parameters by index."""
    try:
        tensors = ckpt.tensors()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{ckpt.path}/trainer.safetensors: unreadable ({e})") from None
    saved = ckpt.state["optimizer"]
    state = {
        int(idx): {name: tensors[f"optim.{idx}.{name}"] for name in names}
        for idx, names in saved["slots"].items()
    }
    groups = saved["param_groups"]
    for group in groups:  # JSON made lists of the tuples
        for key in ("betas", "ns_coefficients"):
            if isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    return {"state": state, "param_groups": groups}


def restore_optimizer(optimizer: Optimizers, ckpt: RunCheckpoint) -> None:
    """Load the saved moments and hyper-parameters into `optimizer` (same parameter order)."""
    saved = optimizer_state(ckpt)
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise optimizer_mismatch(ckpt, e) from None


def optimizer_mismatch(ckpt: RunCheckpoint, problem: Exception) -> CheckpointError:
    """The error for a saved optimizer state that doesn't fit the optimizer built for this run."""
    return CheckpointError(
        f"{ckpt.path}: optimizer state doesn't fit this model ({problem}); resume with the run's own config"
    )


def restore_rng(ckpt: RunCheckpoint) -> None:
    """Put torch, CUDA, numpy and python RNGs back where they were at the checkpoint."""
    tensors = ckpt.tensors()
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and cuda_available() and len(cuda) == cuda_device_count():
        torch.cuda.set_rng_state_all(cuda)
    rng = ckpt.state["rng"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _write_manifest(directory: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    atomic.write_text(directory / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
