"""Shared fixtures: one intra-op thread, and the zoo compacted once per session (several test files read
the same results)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from zoo import ZooResults


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread. With several test processes on two cores, OpenMP threads
    spinning against each other make a 2 ms training step take seconds. (Latency tests pass ``threads``.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def zoo_results() -> ZooResults:
    return ZooResults()
