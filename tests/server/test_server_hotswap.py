"""`gpt2kit serve` answers at once on the eager step while a compiled one builds in a
background process, then swaps it into the running engine (server/stepbuild.py).

Real server processes on loopback, the real `openai` client, real builds of a small model
(2 layers, width 32, GPT-2's vocabulary: ~1-2 minutes on 2 busy cores), each server with
its own empty step cache. The swap is held at the `serve.step_swap` pause point (the step
built and checked, the engine still eager) so the tests know the order of events without
timing anything: a request answered while the pause holds was answered on the eager step.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cli_helpers import free_port
from conftest import tiny_model
from gpt2kit.errors import ConfigError
from gpt2kit.generation.config import SamplingConfig
from gpt2kit.generation.engine import EagerStep, Engine
from gpt2kit.model.compiled import missing_toolchain
from gpt2kit.server.worker import Worker
from pause_helpers import pause_env, wait_paused
from server_helpers import MODEL_NAME, make_bpe_model_dir, make_model_dir

NEEDS_BUILD = pytest.mark.skipif(
    missing_toolchain() is not None, reason=f"compiled steps can't be built here: {missing_toolchain()}"
)
pytestmark = pytest.mark.timeout(1800)  # a build takes minutes on a busy CPU

N_CTX = 512
# Long enough (~0.5-5 s eager) to be in flight when the held swap is let go.
GREEDY = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
# Compiled float32 logits are eager's to ~1e-6 of their scale: a token can't flip but at a
# near-exact tie. In bfloat16 they agree only to ~1e-2 (model/compiled/check.py), and near
# ties are common in a random model's flat distribution, so the swap tests run in float32.
FLOAT32 = ("--dtype", "float32")
SAMPLED = {"model": MODEL_NAME, "prompt": "The cat", "max_tokens": 60, "temperature": 1.0, "seed": 5}
BUILDER = "gpt2kit.server.stepbuild"
STOPPED = (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the SIGTERM it caught


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("hotswap"), n_positions=N_CTX)


class Serve:
    """A `gpt2kit serve` process with its own step cache; its log (stderr) in a file."""

    def __init__(
        self, model_dir: Path, tmp: Path, *flags: str, cache: Path | None = None, **env: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        self.marker = tmp / f"paused-{self.port}"
        self.cmd = [sys.executable, "-m", "gpt2kit", "serve", "--model", str(model_dir)]
        self.cmd += ["--model-name", MODEL_NAME, "--port", str(self.port), "--threads", "1", *flags]
        self.env = {"GPT2KIT_CACHE_DIR": str(cache or tmp / "cache"), **env}
        self.proc: subprocess.Popen | None = None

    def start(self, *, pause_at: str | None = None) -> None:
        env = pause_env(self.marker if pause_at else None, pause_at, **self.env)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            assert self.proc.poll() is None, f"gpt2kit serve exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, "gpt2kit serve did not start"
            time.sleep(0.1)

    def step(self) -> dict:
        """/health's decode_step."""
        return httpx.get(f"{self.url}/health", timeout=30).json()["decode_step"]

    def wait_step(self, done, what: str, *, timeout: float = 1500) -> dict:
        """Poll /health until `done(decode_step)`; the deadline only turns a hang into a failure."""
        deadline = time.monotonic() + timeout
        while not done(info := self.step()):
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"{what}: still {info} after {timeout} s"
            time.sleep(0.2)
        return info

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="-", max_retries=0, timeout=300)

    def text(self, request: dict) -> str:
        return self.client().completions.create(**request).choices[0].text

    def builders(self) -> list[int]:
        """The pids of this server's build processes."""
        assert self.proc is not None
        return [pid for pid, ppid, cmd in processes() if ppid == self.proc.pid and BUILDER in cmd]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()  # a held pause would hold the shutdown too
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def processes() -> Iterator[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rpartition(")")[2].split()[1])
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            yield int(entry.name), ppid, cmd


def alive(pid: int) -> bool:
    """`pid` runs (a zombie, dead and not yet reaped, is not running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def group_members(pgid: int) -> list[int]:
    """Running processes in process group `pgid` (the build process and the compilers it started)."""
    out = []
    for pid, _, _ in processes():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[2]) == pgid and alive(
                pid
            ):
                out.append(pid)
    return out


def wait_builder(server: Serve) -> int:
    deadline = time.monotonic() + 60
    while not (pids := server.builders()):
        assert time.monotonic() < deadline, f"no build process started: {server.log.read_text()}"
        time.sleep(0.05)
    return pids[0]


@NEEDS_BUILD
def test_swap_changes_no_tokens_and_the_first_answer_comes_while_building(model_dir, tmp_path) -> None:
    """--compile --deterministic: one build (DECODE_ROWS rows, no one-row tier). Greedy text
    is the same before the swap, across it (a stream in flight when the step changes) and
    after; seeded sampling is the same before and after. A restart loads the saved step."""
    server = Serve(model_dir, tmp_path, "--compile", "--deterministic", *FLOAT32)
    server.start(pause_at="serve.step_swap:1")
    try:
        assert server.step() == {
            "in_use": "eager",
            "state": "building",
            "build_seconds": None,
            "rows_at_swap": None,
        }
        greedy_before, sampled_before = server.text(GREEDY), server.text(SAMPLED)
        # Answered while the compiled step was still coming: the swap can't have happened
        # before the pause point lets it.
        assert server.step()["in_use"] == "eager" and server.step()["state"] == "building"
        assert len(greedy_before) > 100

        wait_paused(server.proc, server.marker, timeout=1500)  # built, loaded, checked; not swapped
        assert server.step()["in_use"] == "eager"
        stream = iter(server.client().completions.create(**GREEDY, stream=True))
        pieces = [next(stream).choices[0].text]  # the request is running
        server.marker.unlink()  # let the swap go ahead under it
        info = server.wait_step(lambda s: s["in_use"] == "compiled", "the swap")
        pieces += [chunk.choices[0].text for chunk in stream]
        assert info["state"] == "ready" and info["build_seconds"] > 0
        assert info["rows_at_swap"] == 1, "the stream had ended before the swap: nothing went across it"
        assert "".join(pieces) == greedy_before
        assert server.text(GREEDY) == greedy_before
        assert server.text(SAMPLED) == sampled_before

        card = server.client().models.list().data[0]
        assert card.id == MODEL_NAME and card.model_extra["decode_step"]["in_use"] == "compiled"
    finally:
        assert server.stop() in STOPPED
    log = server.log.read_text()
    assert "decode step: eager now, compiled one building in the background (--compile)" in log
    assert "[compiled step] compiling the decode step" in log  # the build's progress, in the server's log
    assert "[compiled step] in use from now on" in log
    assert "warning" not in log.lower() and "not in use" not in log

    again = Serve(model_dir, tmp_path, "--deterministic", *FLOAT32)  # auto: the saved step, at start
    again.start()
    try:
        assert again.step() == {
            "in_use": "compiled",
            "state": "ready",
            "build_seconds": None,
            "rows_at_swap": None,
        }
        assert again.text(GREEDY) == greedy_before and again.text(SAMPLED) == sampled_before
        assert again.builders() == []
    finally:
        again.stop()
    assert "decode step: compiled (the step saved for this model)" in again.log.read_text()


@NEEDS_BUILD
def test_a_failed_build_leaves_the_server_eager_and_health_says_why(model_dir, tmp_path) -> None:
    """The build process can't compile (CXX names no compiler): one warning, eager decoding,
    /health and /v1/models say why."""
    server = Serve(model_dir, tmp_path, "--compile", CXX=str(tmp_path / "no-such-g++"))
    server.start()
    try:
        info = server.wait_step(lambda s: s["state"] != "building", "the failed build", timeout=300)
        assert info["in_use"] == "eager"
        assert info["state"].startswith("failed: building a compiled step needs a C++ compiler"), info
        assert server.text({**GREEDY, "max_tokens": 8})
        card = server.client().models.list().data[0]
        assert card.model_extra["decode_step"] == info
        assert server.builders() == []  # it has exited
    finally:
        assert server.stop() in STOPPED
    warnings = [line for line in server.log.read_text().splitlines() if "not in use" in line]
    assert len(warnings) == 1 and "C++ compiler" in warnings[0] and "serving on the eager step" in warnings[0]


@NEEDS_BUILD
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_the_build_process_ends_with_the_server(model_dir, tmp_path, sig) -> None:
    """Stopped (SIGTERM: the server kills the build's process group) or killed (SIGKILL: the
    kernel kills the build process, PR_SET_PDEATHSIG), no build process outlives the server."""
    # Stopped: neither flag (auto; the model's 1.6M weights per token are enough to pay); killed: --compile.
    server = Serve(model_dir, tmp_path, *(() if sig == signal.SIGTERM else ("--compile",)))
    server.start()
    child = wait_builder(server)
    assert server.step()["state"] == "building"
    code = server.stop(sig)
    assert code in (STOPPED if sig == signal.SIGTERM else (-signal.SIGKILL,))
    deadline = time.monotonic() + 60  # the kernel's SIGKILL lands at once; this bounds a hang only
    while alive(child):
        assert time.monotonic() < deadline, f"build process {child} outlived the server"
        time.sleep(0.05)
    if sig == signal.SIGTERM:
        assert group_members(child) == [], "the build's compilers outlived the server"
        log = server.log.read_text()
        assert (
            "decode step: eager now, compiled one building in the background (1.63M weights read per token: "
            in log
        )


def test_decisions_without_a_build(model_dir, tmp_path) -> None:
    """Neither flag, a model too small for compiling to pay (0.07M weights per token) and no
    saved step: eager, no build process, and /health says why. --no-compile: eager, and says so."""
    small = make_bpe_model_dir(tmp_path / "small", vocab_size=512)
    auto = Serve(small, tmp_path)
    auto.start()
    try:
        info = auto.step()
        assert info["in_use"] == "eager" and info["state"].startswith("not compiled: "), info
        assert "too small for compiling to pay" in info["state"]
        assert auto.builders() == []
    finally:
        auto.stop()
    assert "decode step: eager, not compiled (" in auto.log.read_text()

    off = Serve(model_dir, tmp_path, "--no-compile")
    off.start()
    try:
        assert off.step()["state"] == "not compiled: --no-compile" and off.builders() == []
    finally:
        off.stop()


@NEEDS_BUILD
@pytest.mark.slow
def test_swap_with_the_one_row_tier_changes_no_greedy_tokens(model_dir, tmp_path) -> None:
    """--compile without --deterministic: two builds (the rows' step and the one-row step
    beside it); greedy text the same before, across and after the swap."""
    server = Serve(model_dir, tmp_path, "--compile", "--max-batch-size", "4", *FLOAT32)
    server.start(pause_at="serve.step_swap:1")
    try:
        before = server.text(GREEDY)
        wait_paused(server.proc, server.marker, timeout=1500)
        stream = iter(server.client().completions.create(**GREEDY, stream=True))
        pieces = [next(stream).choices[0].text]
        server.marker.unlink()
        info = server.wait_step(lambda s: s["in_use"] == "compiled", "the swap")
        pieces += [chunk.choices[0].text for chunk in stream]
        assert info["rows_at_swap"] == 1
        assert "".join(pieces) == before == server.text(GREEDY)
    finally:
        assert server.stop() in STOPPED


class NarrowStep(EagerStep):
    """The eager step, declared for at most `slots` rows and a cache of `max_len` positions
    (what a compiled step declares)."""

    def __init__(self, model, *, slots: int, max_len: int | None = None) -> None:
        super().__init__(model)
        self.slots, self.max_len = slots, max_len


def test_a_step_that_does_not_fit_the_cache_is_refused_and_the_engine_goes_on() -> None:
    """Engine.use_step checks before it changes anything; through the worker, the refusal
    reaches the caller's future and the engine keeps decoding on its own step."""
    model = tiny_model(seed=1)
    engine = Engine(model, slots=4)
    own = engine.cache.step
    with pytest.raises(ConfigError, match="takes at most 2 rows; this engine calls it with 4"):
        engine.use_step(NarrowStep(model, slots=2))
    with pytest.raises(ConfigError, match="needs a cache of 32 positions; this engine's holds 64"):
        engine.use_step(NarrowStep(model, slots=4, max_len=32))
    assert engine.cache.step is own
    deterministic = Engine(model, slots=2, deterministic=True)  # calls with DECODE_ROWS (8) rows
    with pytest.raises(ConfigError, match="calls it with 8"):
        deterministic.use_step(NarrowStep(model, slots=4))

    worker = Worker(model, eos_token_id=-1, slots=4)
    try:
        with pytest.raises(ConfigError):
            worker.use_step(NarrowStep(model, slots=2)).result(timeout=60)
        fits = NarrowStep(model, slots=4, max_len=64)
        assert worker.use_step(fits).result(timeout=60) == 0  # no rows were running
        assert worker.engine.cache.step is fits
    finally:
        worker.stop()


def test_rows_in_flight_go_on_with_the_new_step() -> None:
    """A swap between two engine steps, rows half-way: their tokens are those of an engine
    that never swapped (the eager step for the same model, here, so they must be equal)."""
    model = tiny_model(seed=2)
    config = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=4)
    prompts = [[1, 2, 3], [5], [7, 8]]

    def run(swap_at: int | None) -> list[list[int]]:
        engine = Engine(model, slots=4)
        rows = [engine.add(p, config, seed=i) for i, p in enumerate(prompts)]
        for n in range(1000):
            if n == swap_at:
                engine.use_step(NarrowStep(model, slots=4, max_len=engine.max_len))
            if not engine.busy:
                break
            engine.step()
        return [r.tokens for r in rows]

    assert run(swap_at=7) == run(swap_at=None)
