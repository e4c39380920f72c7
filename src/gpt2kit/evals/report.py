"""Results: a terminal table and a JSON document with every number, so runs compare later.

The JSON holds the metrics, per-item details, the model (path, size, config), the task
file and its sha256, the settings, the gpt2kit version and the time of the run. Every
metric is also a top-level key (`doc["perplexity"]`, `doc["acc"]`), beside the same
numbers under `metrics`. A perplexity too large for a float is written as `Infinity`
(Python's json reads it back as inf; strict JSON parsers may not).

>>> doc = results_document(kind="lambada", metrics={"acc": 0.5}, items=[], model={}, task={},
...                        settings={}, elapsed_s=1.0)
>>> print(format_table(doc).splitlines()[-1])
acc       0.5000
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from typing import Any

from gpt2kit import atomic


def results_document(
    *,
    kind: str,
    metrics: dict[str, Any],
    items: list[dict[str, Any]],
    model: dict[str, Any],
    task: dict[str, Any],
    settings: dict[str, Any],
    elapsed_s: float,
) -> dict[str, Any]:
    """The results document; `metrics` are also copied to the top level, after `metrics`.

    A metric named like one of the document's own keys (`task`, `items`, ...) stays only
    under `metrics`; no metric gpt2kit computes has such a name.
    """
    from gpt2kit._version import __version__

    head = {"task": {"kind": kind, **task}, "metrics": metrics}
    rest = {
        "model": model,
        "settings": settings,
        "gpt2kit_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed_s, 3),
        "items": items,
    }
    flat = {k: v for k, v in metrics.items() if k not in head and k not in rest}
    return {**head, **flat, **rest}


def format_table(doc: dict[str, Any]) -> str:
    """The run's header lines and one `metric  value` row per metric."""
    task, model, settings = doc["task"], doc["model"], doc["settings"]
    head = [
        f"task      {task.get('kind')}  {task.get('path', '')}",
        f"model     {model.get('name_or_path', '')}  ({_params(model.get('n_params'))})",
        "settings  " + "  ".join(f"{k}={v}" for k, v in settings.items() if v is not None),
    ]
    width = max(len(k) for k in doc["metrics"]) if doc["metrics"] else 0
    width = max(width, 8)
    rows = [f"{k:<{width}}  {_fmt(v)}" for k, v in doc["metrics"].items()]
    rule = "-" * max(len(line) for line in head + rows)
    return "\n".join([*head, rule, *rows])


def write_results(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write the JSON document atomically (a crash never leaves half a file)."""
    atomic.write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isfinite(v) and abs(v) >= 1000:
            return f"{v:,.2f}"
        return f"{v:.4f}"
    return str(v)


def _params(n: Any) -> str:
    if not isinstance(n, int):
        return "? parameters"
    return f"{n / 1e6:.1f}M parameters" if n >= 1e5 else f"{n:,} parameters"
