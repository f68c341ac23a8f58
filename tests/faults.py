"""Helpers shared by the fault tests (tests/*/test_*_durability.py, issue 18): a tiny tracked MLP, its SGD steps,
the ``sdelip`` command in a subprocess with the repository on its path, and a record written by a real tracker."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdelip.tracking.tracker import Tracker


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["--dataset", "mnist-embedded", "--batch-size", "8", "--max-train-samples", "96", "--no-progress"]


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def tracked_steps(tracker, model, opt, n, M=8, scale=1.0):
    gen = torch.Generator().manual_seed(tracker.step)
    for _ in range(n):
        x, y = torch.randn(M, 6, generator=gen) * scale, torch.randint(0, 3, (M,), generator=gen)
        opt.zero_grad()
        tracker.backward(F.cross_entropy(model(x), y, reduction="none"))
        opt.step()


def run_sdelip(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sdelip", *map(str, args)], env=ENV, capture_output=True,
                          text=True, **kw)


def write_record(path: Path, n: int, close: bool = True):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=path)
    tracked_steps(tr, model, opt, n)
    if close:
        tr.close()
    return tr
