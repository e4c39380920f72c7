"""Getting a compiled step for a model: the one way in (`decode_step`, `compiled_step`).

In order: a step this process already loaded for the same weights is reused; else the
saved step for the model's key (`gpt2kit.model.stepcache`) is loaded; else, with `build`,
it is built (one process at a time per step) and saved. Every step loaded or built runs
the probe of `check.py` first; one that fails it is never saved (built) or is removed
(loaded), and the caller decodes eagerly.

One process-global memo, `_SEEN` (per model object, weakly): the model's key with the
`Weights` it was computed for, and the runners loaded for that key. generate() asks for a
step on every call; hashing gpt2's weights (~0.3 s) and loading its library (~1 s) again
each time would dwarf a short generation.
"""

from __future__ import annotations

import logging
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpt2kit.errors import ConfigError
from gpt2kit.model import stepcache
from gpt2kit.model.compiled import build as _build
from gpt2kit.model.compiled.check import check
from gpt2kit.model.compiled.runtime import CompiledStep, TieredStep, Weights
from gpt2kit.model.gpt2 import GPT2, use_decode_layout

log = logging.getLogger("gpt2kit.model.compiled")

Progress = Callable[[str], None]
# The modules whose source a step's library depends on (part of its key).
CODE = (_build.__file__, Path(_build.__file__).with_name("runtime.py"))


def decode_step(
    model: GPT2,
    *,
    slots: int,
    max_len: int,
    build: bool,
    progress: Progress | None = None,
    tiered: bool = True,
) -> CompiledStep | TieredStep | None:
    """What the engine decodes `slots` rows with, or None to decode eagerly.

    `compiled_step(...)` for `slots` rows and, for more than one, the one-row step beside it
    (`TieredStep`; not with `tiered=False`, where every call must run on the same kernels),
    each loaded if saved, else built if `build`. When a step is wanted but
    can't be had (no C++ compiler, a failed build, a failed check against the eager model),
    logs one warning saying why (once per model and reason) and returns None (or the step
    for `slots` rows alone, when only the one-row step can't be had). Bad arguments are
    still a ConfigError.
    """
    _check_arguments(model, slots, max_len)
    try:
        many = compiled_step(model, slots=slots, max_len=max_len, build=build, progress=progress)
    except ConfigError as e:
        _warn(model, e)
        return None
    if many is None or many.slots == 1 or not tiered:
        return many
    try:
        one = compiled_step(model, slots=1, max_len=max_len, build=build, progress=progress, exact=True)
    except ConfigError as e:
        _warn(model, e)  # `many` serves one row too, a little slower
        return many
    return TieredStep(one, many) if one is not None else many


def _warn(model: GPT2, e: ConfigError) -> None:
    """One warning line per model and reason: generate() asks again at every call."""
    seen = _SEEN.get(model)
    if seen is None or str(e) not in seen.warned:
        log.warning("%s: decoding eagerly", e)
        if seen is not None:
            seen.warned.add(str(e))


def compiled_step(
    model: GPT2,
    *,
    slots: int,
    max_len: int,
    build: bool,
    progress: Progress | None = None,
    cache_dir: str | Path | None = None,
    exact: bool = False,
) -> CompiledStep | None:
    """The compiled decode step for `model` on this machine, for up to `slots` rows.

    Loads the saved step (one with at least `slots` slots; with `exact`, exactly `slots`)
    for this model's weights, dtype, quantization, torch build and machine; when there is
    none, builds and saves it if `build`, else returns None. `max_len` is the cache length
    the caller allocates (any length up to the context works). `progress(message)` is
    called at each phase of a build or load (then the phases are logged at DEBUG only, else
    at INFO); `cache_dir` overrides `stepcache.cache_dir()`.

    Raises ConfigError, one line naming the fix, when a step can't be had: a build is needed
    and fails (no C++ compiler, no Python headers, a failed compile), or the step fails its
    check against the eager model (`check.py`). `decode_step` turns that into a warning.
    """
    _check_arguments(model, slots, max_len)
    if model.wte.weight.device.type == "cpu":
        use_decode_layout(model)  # what the engine does anyway; done first so it isn't a change
    seen = _seen(model)
    fits = sorted(s for s in seen.runners if (s == slots if exact else s >= slots))
    if fits:  # the fewest slots that do
        return seen.step(model, fits[0], max_len)
    phase = _Phases(progress)
    folder = stepcache.steps_folder(Path(cache_dir) if cache_dir is not None else None)
    entry = stepcache.find(folder, seen.key, slots, exact=exact)
    if entry is not None:
        _load(model, seen, entry, phase)
    elif not build:
        log.debug("no compiled step saved for key %s with %d slots in %s", seen.key, slots, folder)
        return None
    else:
        entry = _build_and_save(model, seen, stepcache.Entry(folder, seen.key, slots), phase, exact=exact)
    phase.done()
    return seen.step(model, entry.slots, max_len)


def step_key(model: GPT2) -> str:
    """The step-cache key of `model` as it is now (`stepcache.key_of`; its weights are hashed
    once per state of them)."""
    return _seen(model).key


@dataclass(eq=False)
class _Seen:
    """What this process knows about one model object: its key for `weights`, and the
    runners loaded for that key (slots -> runner, library, whether they passed the check
    against these very tensors)."""

    weights: Weights
    key: str
    description: dict
    runners: dict[int, tuple[object, Path, bool]] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    def step(self, model: GPT2, slots: int, max_len: int) -> CompiledStep:
        runner, library, checked = self.runners[slots]
        step = CompiledStep(
            model, runner, slots=slots, max_len=max_len, library=library, weights=self.weights
        )
        if not checked:  # loaded or built just now, or the same values in new tensors
            try:
                _require_pass(model, step)
            except ConfigError:
                del self.runners[slots]
                raise
            self.runners[slots] = (runner, library, True)
        return step


_SEEN: weakref.WeakKeyDictionary[GPT2, _Seen] = weakref.WeakKeyDictionary()


def _seen(model: GPT2) -> _Seen:
    """The memo for `model`, brought up to date with its weights."""
    seen = _SEEN.get(model)
    if seen is not None and seen.weights.same_as(model):
        return seen
    weights = Weights(model)
    description = stepcache.describe(model, code_files=tuple(map(str, CODE)))
    key = stepcache.key_of(description)
    runners = {}
    if seen is not None and seen.key == key:  # new tensors, same values: keep the runners, unchecked
        runners = {s: (runner, library, False) for s, (runner, library, _) in seen.runners.items()}
    _SEEN[model] = _Seen(weights, key, description, runners, seen.warned if seen is not None else set())
    return _SEEN[model]


def _load(model: GPT2, seen: _Seen, entry: stepcache.Entry, phase: _Phases) -> None:
    """Load `entry` into `seen` and check it; a step that doesn't load or fails its check is
    removed from the cache (a later `build` builds it again, here)."""
    phase(f"loading the compiled step {entry.library}")
    try:
        runner = _build.load_library(entry.library, model.wte.weight.device)
    except RuntimeError as e:
        # The file matched its record yet doesn't load: never trust it again.
        stepcache.remove(entry)
        raise ConfigError(
            f"the compiled step {entry.library} does not load ({_build.first_line(e)}); removed it"
        ) from e
    seen.runners[entry.slots] = (runner, entry.library, False)
    try:
        seen.step(model, entry.slots, model.config.n_positions)
    except ConfigError:
        stepcache.remove(entry)
        raise


def _build_and_save(
    model: GPT2, seen: _Seen, entry: stepcache.Entry, phase: _Phases, *, exact: bool
) -> stepcache.Entry:
    """Build `entry`, check it, and save it if it passes; unless another process saved it
    while this one waited for the lock (then load that one)."""
    failure = stepcache.failure(entry)
    if failure:  # built here before and failed its check: building again gives the same
        raise ConfigError(failure)
    with stepcache.locked(entry):
        found = stepcache.find(entry.folder, entry.key, entry.slots, exact=exact)
        if found is not None:
            _load(model, seen, found, phase)
            return found
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gpt2kit-step-") as tmp:
            library = _build.build_library(model, entry.slots, Path(tmp), phase)
            phase(f"checking the compiled step against the eager model ({entry.slots} slots)")
            runner = _build.load_library(library, model.wte.weight.device)
            seen.runners[entry.slots] = (runner, entry.library, False)
            try:
                seen.step(model, entry.slots, model.config.n_positions)
            except ConfigError as e:
                stepcache.mark_failed(entry, str(e))  # never saved, and not built again
                raise
            phase(f"saving the compiled step to {entry.library}")
            record = {
                "slots": entry.slots,
                "description": seen.description,
                "build_seconds": round(time.perf_counter() - start, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            with open(library, "rb") as f:
                stepcache.save(entry, f, record)
    return entry


def _require_pass(model: GPT2, step: CompiledStep) -> None:
    verdict = check(model, step)
    log.debug("compiled step %s: %s [%.2fs]", step.library, verdict, verdict.seconds)
    if not verdict.ok:
        raise ConfigError(
            f"the compiled step {Path(step.library).name} failed its check against the eager model ({verdict})"
        )


def _check_arguments(model: GPT2, slots: int, max_len: int) -> None:
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ConfigError(f"slots must be a positive integer, got {slots!r}")
    n_positions = model.config.n_positions
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 2 <= max_len <= n_positions:
        raise ConfigError(f"max_len must be an integer in [2, {n_positions}] (the context), got {max_len!r}")
    if n_positions < 3:
        raise ConfigError(
            f"compiled decoding needs a context of 3 positions or more, this model has {n_positions}"
        )


class _Phases:
    """Tells `progress` each phase of a build or load; logs them with the time since the
    start (at INFO when there is no `progress` to show them, else at DEBUG)."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.level = logging.INFO if progress is None else logging.DEBUG
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        log.log(self.level, "%s [%.1fs]", message, time.perf_counter() - self.start)
        if self.progress is not None:
            self.progress(message)

    def done(self) -> None:
        log.log(self.level, "compiled step ready [%.1fs]", time.perf_counter() - self.start)
