"""Helpers shared by the fault tests (tests/*/test_*_durability.py, issue 18; tests/record/test_records_second_round.py,
issue 28): a tiny tracked MLP, its SGD steps, the ``sdelip`` command in a subprocess with the repository on its path,
a record written by a real tracker, the rows a record holds, and a small tmpfs for full-disk cases."""

import contextlib
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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


def run_sdelip(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "sdelip", *map(str, args)], env=env or ENV, capture_output=True,
                          text=True, **kw)


def record_rows(rec) -> int:
    """How many steps a record holds, read-only (0 while it is not a readable record yet)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{rec}?mode=ro", uri=True)) as con:
            return con.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
    except sqlite3.Error:
        return 0


@contextlib.contextmanager
def tmpfs(size: str):
    """A fresh tmpfs of ``size`` (e.g. ``"256k"``) mounted on a temporary folder; skips without the right to mount."""
    folder = Path(tempfile.mkdtemp(prefix="sdelip-tmpfs-"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if res.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}): needs root with CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()


def write_record(path: Path, n: int, close: bool = True):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=path)
    tracked_steps(tr, model, opt, n)
    if close:
        tr.close()
    return tr
