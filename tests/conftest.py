"""Test-session defaults (sweeps in-process unless a test asks for Ray) and shared fixtures.

The tests live in folders that mirror the packages (tests/core/, tests/rules/, …); the
support modules shared by them stay here at the root: ``oracles`` (independent float64
oracles and helpers used by several test files), ``strategies`` (Hypothesis strategies),
``faults`` (the tiny tracked run and the ``sdelip`` subprocess of the fault tests,
tests/*/test_*_durability.py) and ``sweep_tasks`` (task functions a sweep imports by module
name, also in subprocesses). No test module imports another test module.
This folder is put on ``sys.path`` so that ``from oracles import ...`` works from every
subfolder whatever pytest's import mode.
"""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

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
