"""The server's compiled decode step: answer at once on the eager step, build the compiled
one in a separate process, and swap it into the running engine once it passes its check.

`gpt2kit serve` used to build its compiled step (minutes for gpt2 124M) before it answered
anything. Now (`plan`, at start-up): a step saved for this model is loaded (a second or
two) and used from the first request; else, where compiling pays (`compile_pays`) or
`--compile` asks for it, a `BackgroundBuild` starts while the server already answers on the
eager step:

- A child process (`python -m gpt2kit.server.stepbuild`, niced) loads the model with the
  server's own arguments (path, device, dtype, int8 scheme, threads) and builds the step
  into the step cache (`gpt2kit.model.stepcache`). A separate process because exporting
  and compiling hold the GIL for seconds at a time: on a thread they would stall the
  engine thread and the HTTP event loop. Its phase lines go to the server's log.
- The step's cache key includes a fingerprint of the weights, so the server then simply
  loads the saved step for its own weights (`step_for(compile=None)`), which runs the check
  against the eager model (`gpt2kit.model.compiled.check`). A child that loaded other
  weights (the files changed on disk meanwhile) saved a step under another key: nothing is
  found, and the server stays eager.
- The checked step goes to the engine thread as a message (`Worker.use_step`) and is used
  from its next step on; rows in flight go on with it on the same cache.
- A failed build or check: one warning saying why, the server goes on eagerly, and
  `/health` says `failed: <why>`. The child is killed, with the compiler processes it
  started, when the server stops (and dies with the server if that is killed).

`StepStatus` is what `/health` and `/v1/models` show as `decode_step`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from gpt2kit.faults import pause_point
from gpt2kit.generation.engine import DecodeStep, step_for
from gpt2kit.model import stepcache
from gpt2kit.model.gpt2 import GPT2
from gpt2kit.openmp import release_thread_pool
from gpt2kit.server.protocol import DecodeStepInfo

log = logging.getLogger(__name__)

LABEL = "[compiled step]"  # the prefix of the build's lines in the server's log
NICE = 10  # the child's niceness: the server's own threads come first
RESULT = "gpt2kit-stepbuild-result: "  # the child's last line: JSON {"ok", "reason"}
# Compiling pays from this many weights read per decoded token (the blocks and the lm_head):
# the quick start's model (1.3M) decodes 3.2x (float32) to 15x (bfloat16) faster compiled
# at batch 1, gpt2 124M 2.4-3.4x (docs/serving.md, "The compiled decode step"). Smaller
# models (test-sized toys) were not measured: built for only with --compile.
PAYS_FROM_PARAMETERS = 1_000_000


class StepStatus:
    """Which decode step the engine runs and where the compiled one stands; thread-safe.

    `in_use` is "eager" or "compiled"; `state` is "building", "ready", "not compiled: <why>"
    or "failed: <why>"."""

    def __init__(self, *, in_use: str, state: str) -> None:
        self._lock = threading.Lock()
        self._info = DecodeStepInfo(in_use=in_use, state=state)

    @classmethod
    def of(cls, step: DecodeStep | None) -> StepStatus:
        """The status of a server given `step` for good (None: eager)."""
        if step is None:
            return cls(in_use="eager", state="not compiled: eager decoding was asked for")
        return cls(in_use="compiled", state="ready")

    def set(self, **fields: object) -> None:
        with self._lock:
            self._info = self._info.model_copy(update=fields)

    def info(self) -> DecodeStepInfo:
        with self._lock:
            return self._info


@dataclass(frozen=True)
class Spec:
    """What the child needs to load the very model the server holds and build its step."""

    model: str
    device: str
    dtype: str  # "float32", "bfloat16", ...
    quantize: str | None
    threads: int  # torch's intra-op threads: part of the step's key
    rows: int
    deterministic: bool
    parent: int  # the server's pid: the child exits when it is gone


@dataclass(frozen=True)
class Plan:
    """What `plan` decided: the step to start with (None: eager), whether to build one in
    the background, and the status to show."""

    step: DecodeStep | None
    build: bool
    status: StepStatus


def compile_pays(model: GPT2) -> tuple[bool, str]:
    """Whether a compiled step is worth building for `model` in the background, and why.

    A decode step reads every weight of the blocks and the lm_head once per token; eager
    also pays Python and dispatch for each of its ~15 operations per layer, which the
    compiled step fuses away. From `PAYS_FROM_PARAMETERS` such weights up the compiled step
    was measured several times faster; the build costs a few minutes of niced CPU, once.
    """
    device = model.wte.weight.device
    if device.type not in ("cpu", "cuda"):
        return False, f"compiled steps run on CPU and CUDA, not {device.type}"
    if model.config.n_positions < 3:
        return False, "compiled steps need a context of 3 positions or more"
    weights = sum(p.numel() for p in model.h.parameters()) + model.wte.weight.numel()
    size = f"{weights / 1e6:.2f}M weights read per token"
    limit = f"{PAYS_FROM_PARAMETERS / 1e6:g}M"
    if weights < PAYS_FROM_PARAMETERS:
        return False, f"{size}, under {limit}: too small for compiling to pay"
    return True, f"{size}: compiling pays from {limit}"


def plan(model: GPT2, *, compile: bool | None, rows: int, deterministic: bool) -> Plan:
    """The step `gpt2kit serve` starts with, and whether to build one in the background;
    logs the decision in one line. `compile`: None (auto) uses a saved step, else builds one
    in the background where `compile_pays`; True builds one whatever the size; False: eager."""
    if compile is False:
        status = StepStatus(in_use="eager", state="not compiled: --no-compile")
        log.info("decode step: eager (--no-compile)")
        return Plan(None, False, status)
    # Looking one up needs the model's key: its weights hashed and inductor's ISA probed
    # (a test compile, ~3 s): not worth it on the way to the first answer when no step at all is saved.
    step = _saved_step(model, rows=rows, deterministic=deterministic) if _any_saved() else None
    if step is not None:
        log.info("decode step: compiled (the step saved for this model)")
        return Plan(step, False, StepStatus(in_use="compiled", state="ready"))
    pays, why = compile_pays(model)
    if compile is True or pays:
        reason = "--compile" if compile is True else why
        log.info("decode step: eager now, compiled one building in the background (%s)", reason)
        return Plan(None, True, StepStatus(in_use="eager", state="building"))
    log.info("decode step: eager, not compiled (%s; --compile builds one anyway)", why)
    return Plan(None, False, StepStatus(in_use="eager", state=f"not compiled: {why}"))


def _any_saved() -> bool:
    """Whether the step cache holds any step (for any model)."""
    return any(stepcache.steps_folder().glob("*.json"))


def _saved_step(model: GPT2, *, rows: int, deterministic: bool) -> DecodeStep | None:
    return step_for(
        model, slots=rows, max_len=model.config.n_positions, compile=None, deterministic=deterministic
    )


class BackgroundBuild:
    """Builds the compiled step in a child process, loads and checks it, and hands it to
    `use_step` (`Worker.use_step`: the future gets the rows in flight at the swap), setting
    `status` on the way. `start()` once; `stop()` kills the child and its compilers."""

    def __init__(
        self,
        model: GPT2,
        spec: Spec,
        *,
        status: StepStatus,
        use_step: Callable[[DecodeStep], object],
    ) -> None:
        self.model, self.spec, self.status, self.use_step = model, spec, status, use_step
        self._lock = threading.Lock()
        self._stopped = False
        self.child: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="gpt2kit-stepbuild", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Kill the child (its whole process group: inductor's compile workers and g++ too)
        and wait for the build thread."""
        with self._lock:
            self._stopped = True
            child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        start = time.monotonic()
        try:
            reason = self._build()
            if reason is None:
                reason = self._swap(start)
        except Exception as e:  # whatever went wrong, the server goes on eagerly
            reason = f"{type(e).__name__}: {e}"
        finally:
            release_thread_pool()  # the check ran on this thread: leave the engine's team alone
        if reason is not None and not self._stopped:
            log.warning("%s not in use: %s; serving on the eager step", LABEL, reason)
            self.status.set(state=f"failed: {reason}")

    def _build(self) -> str | None:
        """Run the child to its end, its lines into the log; why it failed, or None."""
        command = [sys.executable, "-m", "gpt2kit.server.stepbuild", json.dumps(asdict(self.spec))]
        with self._lock:
            if self._stopped:
                return "the server stopped"
            # Its own session: stop() kills the group, and a Ctrl-C at the terminal reaches
            # the server alone (which then stops the build).
            self.child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        assert self.child.stdout is not None
        result, last = None, ""
        for line in self.child.stdout:
            line = line.rstrip()
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT) :])
            elif line:
                last = line
                log.info("%s %s", LABEL, line)
        code = self.child.wait()
        if self._stopped:
            return "the server stopped"
        if result is not None and result["ok"]:
            return None
        if result is not None:
            return result["reason"]
        return f"the build process exited with status {code} ({last or 'no output'})"

    def _swap(self, start: float) -> str | None:
        """Load the saved step (its check against the eager model runs here), then have the
        engine thread take it; why it failed, or None."""
        spec = self.spec
        with _warnings("gpt2kit.model.compiled") as warned:
            step = _saved_step(self.model, rows=spec.rows, deterministic=spec.deterministic)
        if step is None:
            return (warned or [None])[-1] or (
                "the build saved no step for this server's model (did its files change on disk?)"
            )
        pause_point("serve.step_swap")
        future = self.use_step(step)
        rows = future.result()  # type: ignore[attr-defined]
        seconds = round(time.monotonic() - start, 1)
        self.status.set(in_use="compiled", state="ready", build_seconds=seconds, rows_at_swap=rows)
        log.info(
            "%s in use from now on (%.1fs after start-up; rows in flight that went on with it: %d)",
            LABEL,
            seconds,
            rows,
        )
        return None


@contextlib.contextmanager
def _warnings(name: str) -> Iterator[list[str]]:
    """The warnings logger `name` emits inside the block, instead of logging them (the
    caller says why in one line of its own)."""
    warned: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warned.append(record.getMessage())

    logger = logging.getLogger(name)
    handler, propagate = Keep(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield warned
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


# --- the child ---------------------------------------------------------------------------


def _detach(parent: int) -> None:
    """Run below the server (niced) and die with it: on Linux the kernel sends SIGKILL when
    the server exits, even by SIGKILL (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(NICE)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the server was gone before the line above
        os._exit(1)


def main(argv: list[str]) -> int:
    """The child: build the step `argv[0]` (a `Spec` as JSON) describes; the last line says
    how it went ({"ok", "reason"} after `RESULT`)."""
    spec = Spec(**json.loads(argv[0]))
    _detach(spec.parent)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    reason = None
    try:
        import torch

        torch.set_num_threads(spec.threads)
        model = GPT2.from_pretrained(
            spec.model, device=spec.device, dtype=getattr(torch, spec.dtype), quantize=spec.quantize
        )
        with _warnings("gpt2kit.model.compiled") as warned:
            step = step_for(
                model,
                slots=spec.rows,
                max_len=model.config.n_positions,
                compile=True,
                progress=lambda message: print(message, flush=True),
                deterministic=spec.deterministic,
            )
        if step is None:
            reason = (warned or ["no step was built"])[-1].removesuffix(": decoding eagerly")
    except Exception as e:  # said in the result line; the server decides what to do
        reason = f"{type(e).__name__}: {e}"
    print(RESULT + json.dumps({"ok": reason is None, "reason": reason}), flush=True)
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
