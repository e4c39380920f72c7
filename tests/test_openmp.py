"""release_thread_pool: the calling thread's OpenMP workers end, and parallel work still runs."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from gpt2kit.openmp import _libgomp, release_thread_pool

gnu_openmp = pytest.mark.skipif(
    _libgomp() is None or not os.path.isdir("/proc/self/task"), reason="needs Linux and torch on GNU OpenMP"
)


@pytest.fixture(autouse=True)
def two_threads():
    """Teams of 2 (conftest runs the suite on 1 thread, which starts no workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_work() -> torch.Tensor:
    return torch.ones(1 << 22).add_(1).sum()  # large enough for torch to split it across threads


@gnu_openmp
def test_release_ends_the_calling_threads_workers_and_work_goes_on() -> None:
    parallel_work()
    before = threads()
    assert release_thread_pool() is True
    assert threads() == before - 1
    assert parallel_work().item() == 2 * (1 << 22)  # a new team starts
    assert threads() == before


@gnu_openmp
def test_a_thread_that_never_computed_releases_nothing_and_succeeds() -> None:
    results = []

    def run() -> None:
        results.append((threads(), release_thread_pool(), threads()))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    before, released, after = results[0]
    assert released is True and after == before


def test_it_is_safe_to_call_anywhere() -> None:
    assert isinstance(release_thread_pool(), bool)
    assert parallel_work().item() == 2 * (1 << 22)
