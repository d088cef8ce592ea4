"""Fixtures shared by the test folders."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """For tests of tiny models: one thread is as fast and does not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
