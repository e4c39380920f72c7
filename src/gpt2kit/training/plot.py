"""Loss curves of a run as a PNG: train loss per logged step and val loss per evaluation.

Reads RUN_DIR/metrics.jsonl (metrics.py), so it works on a live run too. Uses matplotlib's
Agg backend: no display needed.

>>> plot_run("runs/shakespeare", "runs/shakespeare/loss.png")  # doctest: +SKIP
PosixPath('runs/shakespeare/loss.png')
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from gpt2kit import atomic
from gpt2kit.errors import DataError
from gpt2kit.training.metrics import read_metrics


def plot_run(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, title: str | None = None
) -> Path:
    """Draw train and val loss against step into `out` (default RUN_DIR/loss.png); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # never needs a display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    if not train and not evals:
        raise DataError(f"{run_dir}: no metrics.jsonl records yet; is this a gpt2kit train run directory?")
    out = Path(out) if out is not None else run_dir / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    if train:
        ax.plot(
            [r["step"] for r in train], [r["loss"] for r in train], label="train (batch)", lw=1, alpha=0.6
        )
    for key, label in (("train_loss", "train (eval)"), ("val_loss", "val")):
        points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic.write_bytes(out, buf.getvalue())
    return out
