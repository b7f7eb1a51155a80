"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a shared 2-core machine: one thread is several times faster than contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scratch_objectives():
    """Register throw-away objectives; removed again after the test."""
    from sspo_analysis import objectives

    before = set(objectives._REGISTRY)
    yield objectives.register_objective
    for name in set(objectives._REGISTRY) - before:
        del objectives._REGISTRY[name]
