"""TrainConfig: every training setting in one dataclass, filled from TOML plus `key=value` overrides.

No Python config files are executed: a TOML file sets keys, `--set key=value` overrides them,
and every value is checked here with an error naming the key. The resolved config is written
to `RUN_DIR/config.toml`, which `gpt2kit train --resume` reads back.

>>> cfg = TrainConfig.load(overrides=["max_steps=200", "lr=3e-4"])
>>> cfg.max_steps, cfg.lr
(200, 0.0003)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2kit.dtypes import DTYPE_CHOICES
from gpt2kit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, as a package (a dependency on Python 3.10)
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = DTYPE_CHOICES
PARALLEL = ("ddp", "fsdp")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
SCHEDULE_ALIASES = {"trapezoidal": "wsd"}  # the other name of warmup-stable-decay
MUON_ADJUST_LR = ("original", "match_rms_adamw")


def _key(default: Any, help: str) -> Any:
    """A setting with its default and its one-line help (`gpt2kit train --help` lists them)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Training settings (nanoGPT's names where they exist). Sizes are per optimizer step.

    The global batch of one optimizer step is `batch_size * grad_accum` sequences of
    `block_size` tokens, whatever the number of processes: with N processes each runs
    `grad_accum / N` micro-steps, so the loss curve doesn't depend on N.
    """

    # data and model
    data: str = _key("", "prepared data directory (gpt2kit prepare; --data)")
    init_from: str = _key(
        "scratch",
        "scratch, scratch:PRESET (a preset's shape, e.g. scratch:gpt2), or a model dir / hub id to fine-tune",
    )
    n_layer: int = _key(6, "transformer blocks (from scratch)")
    n_head: int = _key(6, "attention heads (from scratch)")
    n_embd: int = _key(384, "embedding width (from scratch)")
    block_size: int = _key(256, "context length trained on")
    dropout: float = _key(0.0, "embedding, attention and residual dropout")
    # optimisation
    batch_size: int = _key(12, "sequences per micro-step per process")
    grad_accum: int = _key(1, "micro-steps per optimizer step, summed over all processes")
    max_steps: int = _key(2000, "optimizer steps")
    max_minutes: float = _key(0.0, "a time budget: the schedule ends when it does (or at max_steps); 0: none")
    optimizer: str = _key("adamw", "adamw, or muon: Muon for the blocks' matrices, AdamW for the rest")
    lr: float = _key(6e-4, "AdamW's peak lr (with optimizer=muon: of embeddings, LayerNorms, biases)")
    schedule: str = _key("cosine", "after warmup: cosine to min_lr, or wsd: constant, then linear to 0")
    min_lr: float = _key(-1.0, "end of the cosine decay; negative means lr / 10")
    warmup_steps: int = _key(100, "steps of linear warmup")
    decay_fraction: float = _key(0.4, "wsd: the last fraction of the budget spent decaying to 0")
    weight_decay: float = _key(0.1, "AdamW's weight decay, on >= 2-D parameters only")
    beta1: float = _key(0.9, "AdamW's beta1")
    beta2: float = _key(0.95, "AdamW's beta2")
    # Muon (optimizer="muon"): torch.optim.Muon on the blocks' c_attn, c_proj, c_fc weights
    muon_lr: float = _key(0.02, "Muon's peak lr")
    muon_momentum: float = _key(0.95, "Muon's momentum")
    muon_nesterov: bool = _key(True, "Nesterov momentum for Muon")
    muon_ns_steps: int = _key(5, "Newton-Schulz iterations per Muon step")
    muon_weight_decay: float = _key(0.0, "decoupled: each step multiplies the weights by 1 - muon_lr * this")
    muon_adjust_lr_fn: str = _key("original", "original: lr x sqrt(max(1, rows/cols)); or match_rms_adamw")
    grad_clip: float = _key(1.0, "clip the global gradient norm at this; 0 disables clipping")
    skip_nonfinite: bool = _key(False, "skip steps with a NaN/inf loss instead of stopping")
    # evaluation, logging, checkpoints
    eval_interval: int = _key(250, "estimate train/val loss every N steps")
    eval_iters: int = _key(20, "batches per loss estimate")
    log_interval: int = _key(10, "a metrics record every N steps")
    ckpt_interval: int = _key(500, "a checkpoint every N steps (and at the end)")
    keep_last: int = _key(2, "checkpoints kept besides the best one")
    # system
    seed: int = _key(1337, "weights, dropout and data order")
    device: str = _key("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = _key(
        "auto",
        "auto: bfloat16 autocast where the device has native bf16, else float32; or float32, bfloat16, float16",
    )
    compile: bool = _key(False, "torch.compile the model")
    parallel: str = _key("ddp", "with several processes: ddp (replicas) or fsdp (sharded)")
    threads: int = _key(0, "CPU threads for torch; 0 keeps torch's default")

    def __post_init__(self) -> None:
        self.schedule = SCHEDULE_ALIASES.get(self.schedule, self.schedule)
        self.validate()

    # --- loading and saving ---------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        overrides: list[str] | None = None,
        base: dict[str, Any] | None = None,
    ) -> TrainConfig:
        """Defaults, then `base`, then the TOML file at `path`, then `key=value` overrides."""
        values: dict[str, Any] = dict(base or {})
        if path is not None:
            values.update(_read_toml(Path(path)))
        for item in overrides or []:
            key, value = parse_override(item)
            values[key] = value
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                fix = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(known)}"
                raise ConfigError(f"unknown key {key!r} in {source}; {fix}")
            kwargs[key] = _coerce(key, value, known[key].type)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML text that `load` reads back to an equal config."""
        lines = ["# gpt2kit train configuration (resolved; `gpt2kit train --config` reads it)"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {toml_value(value)}")
        return "\n".join(lines) + "\n"

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def settings(cls) -> list[tuple[str, Any, str]]:
        """(key, default, help) of every setting, in the order of the class."""
        return [(f.name, f.default, f.metadata["help"]) for f in dataclasses.fields(cls)]

    # --- checks ---------------------------------------------------------------------------

    def validate(self) -> None:
        positive = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps"]
        positive += ["eval_interval", "eval_iters", "log_interval", "ckpt_interval", "keep_last"]
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        for key in ("warmup_steps", "threads", "max_minutes"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for key in ("lr", "muon_lr", "weight_decay", "muon_weight_decay", "grad_clip"):
            value = getattr(self, key)
            strict = key in ("lr", "muon_lr")
            if not math.isfinite(value) or value < 0 or (strict and value == 0):
                raise ConfigError(
                    f"{key} must be a finite number {'> 0' if strict else '>= 0'}, got {value!r}"
                )
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if not 1 <= self.muon_ns_steps < 100:
            raise ConfigError(f"muon_ns_steps must be an integer from 1 to 99, got {self.muon_ns_steps!r}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr}); negative means lr / 10")
        for key in ("beta1", "beta2", "dropout", "muon_momentum"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {value!r}")
        choices = [("device", DEVICES), ("dtype", DTYPES), ("parallel", PARALLEL), ("optimizer", OPTIMIZERS)]
        choices += [("schedule", SCHEDULES), ("muon_adjust_lr_fn", MUON_ADJUST_LR)]
        for key, allowed in choices:
            value = getattr(self, key)
            if value not in allowed and not (key == "device" and value.startswith(("cuda:", "mps:"))):
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        if not self.init_from:
            raise ConfigError("init_from must be 'scratch', 'scratch:PRESET' or a model directory / hub id")

    @property
    def decay_to(self) -> float:
        return self.min_lr if self.min_lr >= 0 else self.lr / 10


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` with a TOML value (`lr=3e-4`, `compile=true`); bare words are strings."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}; e.g. --set max_steps=500")
    raw = raw.strip()
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw  # e.g. device=cuda or init_from=runs/x/final without quotes


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; check the --config path") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"{path}: tables are not supported ([{nested[0]}]); write keys at the top level")
    return values


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def toml_value(value: Any) -> str:
    """`value` as TOML text (what `parse_override` and TOML files read back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
