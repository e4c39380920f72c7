"""The compiled decode step for `gpt2kit generate` and `gpt2kit serve`, with progress.

`--compile` / `--no-compile` mean what `compile=True` / `False` mean in the library
(`gpt2kit.generation.engine.step_for`); without either flag (None), a saved step is used
when there is one, else decoding is eager. A step is used only after it passes its check
against the eager model; when one is wanted but can't be had, one warning says why.
"""

from __future__ import annotations

COMPILE_HELP = (
    "--compile: decode with the compiled step, building it first when none is saved for this "
    "model, dtype and machine (minutes, once; needs a C++ compiler); --no-compile: never, decode "
    "eagerly; neither: the saved step when there is one, else eager (nothing is built). A step is "
    "used only after it passes its check against the eager model; when it can't be had (no "
    "compiler, a failed build or check), a warning says why and decoding is eager (docs/generation.md)"
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
