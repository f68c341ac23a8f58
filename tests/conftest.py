"""Test-session defaults (sweeps in-process unless a test asks for Ray) and shared fixtures."""

import os

import pytest

# the default of --workers in experiments/common.py and experiments/run_all (Ray with one task per core otherwise)
os.environ.setdefault("SDELIP_SWEEP_WORKERS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: small tensors run faster, and immune to oversubscription on shared CPUs."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
