"""Fixtures for the mlcore tests. Nothing here imports Django."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def single_torch_thread():
    """Run torch on one thread: on a 2-core machine shared with other work, two intra-op threads fighting over
    one free core make training several times slower, while one thread costs little. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
