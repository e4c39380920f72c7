"""Named pause points: a fault test stops a real process at an exact moment, then kills it there.

A kill test that picks its moment with a sleep races the machine: on a fast one the run is
over before the kill lands, on a slow one the kill lands before the moment it means. So the
code marks the moments with `pause_point(name)`, and a test arms one through the environment:

    GPT2KIT_PAUSE_AT=checkpoint.mid_write:2   pause the 2nd time this process reaches the point
                                              (":N" may be left out: the 1st time)
    GPT2KIT_PAUSE_FILE=/tmp/x/paused          where to say so

When the armed point is reached, the process writes the pause file ("NAME:N PID") and waits,
there, until the file is removed (then it goes on) or the process is killed. The test waits
for the file, kills (or signals) the process, and knows where it was. docs/reliability.md
lists the points and the tests that use them.

The environment is read once, at import: with GPT2KIT_PAUSE_AT unset a pause point costs a
function call and one dict lookup, so points may sit in loops that run every step.
"""

from __future__ import annotations

import os
import time

from gpt2kit import atomic
from gpt2kit.errors import Gpt2kitError

# Every point, where it is, and what is on disk when a process is killed there.
POINTS = {
    "train.mid_step": "training/loop.py: a step's gradients are computed, the weights not yet updated",
    "train.mid_eval": "training/loop.py: an evaluation is computed, not yet recorded in metrics.jsonl",
    "train.after_checkpoint": "training/loop.py: a checkpoint is saved, `latest` points at it, old ones pruned",
    "checkpoint.mid_write": "training/checkpoint.py: the hidden .ckpt-*.tmp directory holds the model "
    "files, not yet the trainer state or the manifest",
    "checkpoint.renamed": "training/checkpoint.py: the checkpoint directory is in place, `latest` still "
    "names the previous one",
    "prepare.mid_shard": "data/prepare.py: bytes of a shard are in its hidden temporary file, not yet renamed",
    "serve.engine_step": "server/worker.py: the engine thread, before a decoding step (HTTP still answers)",
    "serve.step_swap": "server/stepbuild.py: a compiled step built in the background is loaded and "
    "checked, not yet handed to the engine thread (which goes on decoding eagerly)",
}

AT_VAR, FILE_VAR = "GPT2KIT_PAUSE_AT", "GPT2KIT_PAUSE_FILE"


class PausePointError(Gpt2kitError):
    """GPT2KIT_PAUSE_AT names no pause point, or GPT2KIT_PAUSE_FILE is missing."""


def _armed(spec: str) -> dict[str, int]:
    """{point: N} from "NAME[:N],NAME[:N]..."; an unknown name is an error, not a silent no-op."""
    armed = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition(":")
        if name not in POINTS:
            raise PausePointError(
                f"{AT_VAR}={spec!r}: no pause point {name!r}; the points are {sorted(POINTS)}"
            )
        if nth and not (nth.isdigit() and int(nth) >= 1):
            raise PausePointError(
                f"{AT_VAR}={spec!r}: {item!r} needs a count >= 1 after the colon, e.g. {name}:2"
            )
        armed[name] = int(nth or 1)
    if armed and not os.environ.get(FILE_VAR):
        raise PausePointError(
            f"{AT_VAR} is set but {FILE_VAR} is not: set it to the file to write when paused"
        )
    return armed


_ARMED = _armed(os.environ.get(AT_VAR, ""))
_reached: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Pause here if GPT2KIT_PAUSE_AT arms `name` for this time it is reached (module docstring)."""
    if name not in _ARMED:
        return
    count = _reached[name] = _reached.get(name, 0) + 1
    if count == _ARMED[name]:
        _pause(f"{name}:{count}")


def _pause(where: str) -> None:
    marker = os.environ[FILE_VAR]
    atomic.write_text(marker, f"{where} {os.getpid()}\n")  # the test never reads half a marker
    while os.path.exists(marker):  # a signal's Python handler runs during the sleep
        time.sleep(0.01)
