"""The compiled decode step for `gpt2kit generate`, with progress, and `gpt2kit serve`'s flag.

For `generate`, `--compile` / `--no-compile` mean what `compile=True` / `False` mean in the
library (`gpt2kit.generation.engine.step_for`); without either flag (None), a saved step
is used when there is one, else decoding is eager. A step is used only after it passes its
check against the eager model; when one is wanted but can't be had, one warning says why.
`serve` builds its step in the background instead (`gpt2kit.server.stepbuild`; its flag's
meanings: `SERVE_COMPILE_HELP`).
"""

from __future__ import annotations

COMPILE_HELP = (
    "--compile: decode with the compiled step, building it first when none is saved for this "
    "model, dtype and machine (minutes, once; needs a C++ compiler); --no-compile: never, decode "
    "eagerly; neither: the saved step when there is one, else eager (nothing is built). A step is "
    "used only after it passes its check against the eager model; when it can't be had (no "
    "compiler, a failed build or check), a warning says why and decoding is eager (docs/generation.md)"
)


SERVE_COMPILE_HELP = (
    "the compiled decode step (docs/serving.md). Neither flag: a step saved for this model, "
    "dtype and machine is loaded at start-up; else, where compiling pays for this model's size "
    "(the log says what was decided), one is built in a background process while the server "
    "already answers on the eager step, and swapped in once it passes its check against the "
    "eager model. --compile: build it in the background whatever the "
    "size; --no-compile: eager only. /health and /v1/models show which step is in use; a "
    "failed build leaves the server eager, with one warning saying why"
)


def prepare(model, *, rows: int, compile: bool | None, deterministic: bool = False):
    """Get (load, or with `compile` build, with progress on stderr) the decode step for
    `rows` rows now (for a `deterministic` engine, `step_for`'s), so `generate`/`complete` and
    the server find it loaded; None: eager."""
    from gpt2kit.cli._progress import Ticker
    from gpt2kit.generation.engine import step_for

    if compile is False:
        return None
    with Ticker("compiled step") as tick:
        step = step_for(
            model,
            slots=rows,
            max_len=model.config.n_positions,
            compile=compile,
            progress=tick,
            deterministic=deterministic,
        )
        tick.gave_up = step is None  # a warning said why; nothing is "ready"
    return step
