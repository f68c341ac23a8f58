"""Records, checkpoints and sweeps under faults (issue 18): real processes, real kill -9, real mounts.

Where a test needs to take away write access it uses, in this order, what the machine
allows: a read-only bind mount (root with CAP_SYS_ADMIN), a process running as the user
``nobody`` (root without mounts), or plain ``chmod`` (not root: permissions then bind).
The disk-full test uses a small tmpfs mount and is skipped where mounting is not allowed.
"""

import contextlib
import copy
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdelip.checkpoint import CheckpointWriteError, UnsafeCheckpointError, save_checkpoint
from sdelip.cli import main
from sdelip.record import NotARecordError, RecordLockedError, copy_record, load_metadata, load_record, records_equal
from sdelip.tracker import CHECKPOINT_FORMAT, Tracker

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["--dataset", "mnist-embedded", "--batch-size", "8", "--max-train-samples", "96", "--no-progress"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _steps(tracker, model, opt, n, M=8, scale=1.0):
    gen = torch.Generator().manual_seed(tracker.step)
    for _ in range(n):
        x, y = torch.randn(M, 6, generator=gen) * scale, torch.randint(0, 3, (M,), generator=gen)
        opt.zero_grad()
        tracker.backward(F.cross_entropy(model(x), y, reduction="none"))
        opt.step()


def _sdelip(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sdelip", *map(str, args)], env=ENV, capture_output=True,
                          text=True, **kw)


# ---------------------------------------------------------------------------------------------------------------
# 2. checkpoints are loaded as data: a crafted pickle is refused and its payload never runs
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path, fmt: str) -> Path:
    torch.save({"format": fmt, "step": 0, "payload": _Payload(marker)}, path)
    return path


def test_crafted_checkpoint_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    evil = _crafted(tmp_path / "evil.pt", marker, CHECKPOINT_FORMAT)
    model = _model()
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil\.pt.*posix\.system|refusing to load "
                                                     r".*evil\.pt.*system"):
        Tracker.resume(evil, model, torch.optim.SGD(model.parameters(), lr=0.1), record=tmp_path / "r.db")
    assert not marker.exists()
    tr = Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(UnsafeCheckpointError):
        tr.restore(evil)
    assert not marker.exists()
    # the training checkpoint, through the command line
    evil2 = _crafted(tmp_path / "evil2.pt", marker, "sdelip-train-checkpoint-3")
    res = _sdelip("track", "--record", tmp_path / "t.db", "--checkpoint", evil2, "--steps", "3", *TINY)
    assert res.returncode == 2 and "refusing to load" in res.stderr and "evil2.pt" in res.stderr, res.stderr
    assert "earlier version" not in res.stderr
    assert not marker.exists()


def test_checkpoint_holds_data_only_and_round_trips(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt)
    _steps(tr, model, opt, 3)
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\] is a .*Path"):
        tr.checkpoint(tmp_path / "c.pt", extra=Path("x"))
    tr.checkpoint(tmp_path / "c.pt", extra={"epoch": 1, "seen": [1, 2]})
    torch.load(tmp_path / "c.pt", weights_only=True)  # loadable as pure data
    assert tr.restore(tmp_path / "c.pt") == {"epoch": 1, "seen": [1, 2]}
    # random bytes, a truncated file and a folder are named
    (tmp_path / "junk.pt").write_bytes(os.urandom(300))
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    for name in ("junk.pt", "cut.pt"):
        with pytest.raises(ValueError, match=rf"{name}.* is not readable as an sdelip tracker checkpoint"):
            tr.restore(tmp_path / name)
    with pytest.raises(ValueError, match="is a directory"):
        tr.restore(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 1. one writer per record
HOLDER = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    from sdelip.tracker import Tracker
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    tr = Tracker(model, torch.optim.SGD(model.parameters(), lr=0.01), record=sys.argv[1])
    print("holding", flush=True)
    time.sleep(120)
    """
)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    rec = tmp_path / "r.db"
    script = tmp_path / "hold.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(rec)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        # another process: sdelip track on the same record
        res = _sdelip("track", "--record", rec, "--steps", "3", "--lr", "0.2", *TINY)
        assert res.returncode == 2
        assert f"{rec}" in res.stderr and f"process {holder.pid} on host" in res.stderr, res.stderr
        # another Tracker in this process, also with overwrite=True
        model = _model()
        for kw in ({}, {"overwrite": True}):
            with pytest.raises(RecordLockedError, match=rf"being written by another writer \(process {holder.pid}"):
                Tracker(model, torch.optim.SGD(model.parameters(), lr=0.2), record=rec, **kw)
        # the holder's record is untouched: its metadata is its own
        assert load_metadata(rec)["lr"] == 0.01
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): its lock went with it, a new writer is let in
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with Tracker(model, opt, record=rec, overwrite=True) as tr:
        _steps(tr, model, opt, 2)
        with pytest.raises(RecordLockedError):  # and two Trackers in one process exclude each other too
            Tracker(model, opt, record=rec, overwrite=True)
    assert not (tmp_path / "r.db.lock").exists()
