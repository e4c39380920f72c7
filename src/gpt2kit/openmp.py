"""One OpenMP thread team at a time: let a compute thread have the CPU's cores to itself.

torch on Linux runs its CPU kernels, and compiled decode steps theirs, on GNU OpenMP
(libgomp). Each thread that starts a parallel region gets its own team of worker threads,
kept for the life of that thread. When the teams hold more threads than the process has
cores, libgomp stops spin-waiting between parallel regions (for every thread, for as long
as the teams live) and parks its workers in the kernel instead: a gpt2 decode step starts
parallel loops in most of its kernels, in every layer, and each wake-up then costs a
system call. On a 2-core machine a compiled gpt2 step called from a second thread ran at
about half the speed it has on the main thread (benchmarks/README.md, "Serving gpt2").

The server decodes on its own thread after the main thread has loaded the model (which
made the main thread's team): `release_thread_pool()`, called on the main thread before
the engine thread starts, ends the main thread's team so the engine's is the only one.

>>> release_thread_pool()  # doctest: +SKIP
True
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch  # noqa: F401  (loads the OpenMP runtime this module looks up)

log = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep the runtime usable


def _libgomp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime this process uses (the one torch loaded), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        process = ctypes.CDLL(None)  # every library loaded into the global namespace (torch's libgomp)
    except OSError:
        return None
    # LLVM's and Intel's runtimes also export GOMP_* entry points (and their own __kmpc_*);
    # their pause may stop every thread's team, not the caller's: left alone.
    if not hasattr(process, "GOMP_parallel") or hasattr(process, "__kmpc_fork_call"):
        return None
    if not hasattr(process, "omp_pause_resource_all"):  # OpenMP 5.0, GCC 9 and later
        return None
    return process


def release_thread_pool() -> bool:
    """End the calling thread's OpenMP worker threads (its next parallel region starts a new
    team). Returns whether a GNU OpenMP runtime released them; elsewhere it does nothing.
    Call it on a thread that is done computing, before another thread starts to."""
    gomp = _libgomp()
    if gomp is None:
        return False
    status = gomp.omp_pause_resource_all(_OMP_PAUSE_SOFT)
    if status != 0:  # called inside a parallel region: nothing was released
        log.debug("omp_pause_resource_all returned %d", status)
        return False
    return True
