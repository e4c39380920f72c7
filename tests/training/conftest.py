"""Fixtures of the training tests: one prepared data directory per test module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_helpers import make_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared byte-level data directory (train_helpers.make_data), shared by a module's tests."""
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def keep_threads():
    """Runs set `threads` (torch.set_num_threads); put the count back for the next test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
