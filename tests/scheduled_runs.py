"""A tracked run with a learning-rate schedule (StepLR), written to a record: the fixture of the
schedule tests of the simulations (tests/sde/test_schedules.py, tests/cli/test_cli_schedules.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def steplr_record(path: Path, steps: int = 30, lr: float = 0.2, step_size: int = 10, gamma: float = 0.1) -> Path:
    """A small MLP trained with SGD and StepLR(step_size, gamma) on fixed random data, every step tracked."""
    from sdelip.tracking import Tracker

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 6, generator=g, dtype=torch.float64)
    Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    with Tracker(model, opt, path) as tr:
        for k in range(steps):
            idx = torch.randint(0, 256, (16,), generator=g)
            opt.zero_grad()
            tr.backward(F.cross_entropy(model(X[idx]), Y[idx], reduction="none"))
            opt.step()
            sched.step()
    return path
