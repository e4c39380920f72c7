"""Progress for the CLI's long waits: a phase line with a live elapsed-time counter on stderr."""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType


class Ticker:
    """Prints each phase message; on a terminal, the current line counts the seconds spent.

    Used as the `progress` callback of long library work (building a compiled step):

    >>> with Ticker("compiled step") as tick:  # doctest: +SKIP
    ...     compiled_step(model, slots=1, max_len=1024, build=True, progress=tick)
    """

    def __init__(self, label: str, *, stream=None, interval: float = 1.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = interval
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.message = ""
        self.start = self.phase_start = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.gave_up = False  # set it to end without the "ready" line (the caller says why)

    def __call__(self, message: str) -> None:
        with self._lock:
            if self.live and self.message:
                self._draw(final=True)
            self.message, self.phase_start = message, time.monotonic()
            if not self.live:
                print(f"[{self.label}] {message}", file=self.stream, flush=True)
            else:
                self._draw()

    def _draw(self, *, final: bool = False) -> None:
        elapsed = time.monotonic() - self.phase_start
        end = "\n" if final else ""
        print(
            f"\r[{self.label}] {self.message} ({elapsed:.0f}s)\033[K", end=end, file=self.stream, flush=True
        )

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self.message:
                    self._draw()

    def __enter__(self) -> Ticker:
        if self.live:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.live and self.message:
                self._draw(final=True)
        if self.message and kind is None and not self.gave_up:
            total = time.monotonic() - self.start
            print(f"[{self.label}] ready in {total:.1f}s", file=self.stream, flush=True)
