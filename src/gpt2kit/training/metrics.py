"""Training metrics: RUN_DIR/metrics.jsonl (one JSON object per line) and TensorBoard when installed.

Train records: {"step", "loss", "lr", "tokens_per_s", "time", ...}; eval records add "kind": "eval"
with "train_loss" and "val_loss". Each line is flushed as written, so `tail -f` and
`gpt2kit plot` see a live run. Appending (not rewriting) keeps earlier records when resuming;
`read_metrics` drops records past a resumed step so curves stay single-valued.

>>> with MetricsLog("runs/x") as m:  # doctest: +SKIP
...     m.write({"step": 10, "loss": 3.2, "lr": 6e-4, "tokens_per_s": 12000.0})
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only metrics.jsonl writer, mirrored to TensorBoard when it is importable."""

    def __init__(self, run_dir: str | os.PathLike[str], *, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = _tensorboard(Path(run_dir) / "tb")
        if resume_step is not None:
            # A run killed after its last checkpoint logged steps that will run again: mark the
            # restart so readers keep only the records from before it and after it.
            self.write({"kind": "resume", "step": resume_step})

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for key, value in record.items():
                if key not in ("step", "kind", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(run_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of a run, in step order, replays after a resume removed."""
    path = Path(run_dir) / "metrics.jsonl"
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a crash
        if not isinstance(record, dict) or "step" not in record:
            continue
        step = int(record["step"])
        kind = record.get("kind", "train")
        if kind == "resume":
            # The run continued from this step: forget what the killed process logged after it.
            train = {s: r for s, r in train.items() if s <= step}
            evals = {s: r for s, r in evals.items() if s <= step}
        elif kind == "eval":
            evals[step] = record
        else:
            train[step] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _tensorboard(log_dir: Path):
    try:
        import tensorboard  # noqa: F401 - SummaryWriter needs it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(log_dir=str(log_dir))
    except Exception as e:  # a broken TensorBoard install must not stop training
        log.warning("TensorBoard disabled: %s", e)
        return None
