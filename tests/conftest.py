"""Shared fixtures: the zoo compacted once per session (several test files read the same results)."""

from __future__ import annotations

import pytest
from zoo import ZooResults


@pytest.fixture(scope="session")
def zoo_results() -> ZooResults:
    return ZooResults()
