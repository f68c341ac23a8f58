"""The ``sdelip`` command under faults (issue 18): real processes, real kill -9, a full disk, clear messages.

The disk-full test uses a small tmpfs mount and is skipped where mounting is not allowed.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdelip.cli import main
from sdelip.record import load_metadata, records_equal
from sdelip.tracking.checkpoint import CheckpointWriteError, save_checkpoint
from sdelip.tracking.tracker import Tracker

from faults import ENV, TINY, record_rows as _rows, run_sdelip, tiny_model, tmpfs as _tmpfs, tracked_steps, write_record


# ---------------------------------------------------------------------------------------------------------------
# 3. the plain rerun of a killed `sdelip track` continues it; a full disk during a checkpoint


@pytest.mark.slow
def test_kill_9_then_the_same_command_continues_the_run(tmp_path):
    steps = 200  # long enough that a quiet machine cannot finish before the poll below sees 19 rows
    args = ["track", "--record", tmp_path / "r.db", "--steps", steps, "--lr", "0.05", *TINY]
    env = {**ENV, "SDELIP_CHECKPOINT_MIN_INTERVAL_S": "0.3"}  # the default (2 s) would need a longer run
    proc = subprocess.Popen([sys.executable, "-m", "sdelip", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240

    def checkpointed() -> int:
        try:
            return int(torch.load(tmp_path / "r.db.ckpt", weights_only=True)["step"])
        except Exception:  # not written yet, or being replaced
            return 0

    # kill -9 once it has written 19 rows and an automatic checkpoint after step 0
    while (_rows(tmp_path / "r.db") < 19 or checkpointed() == 0) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _rows(tmp_path / "r.db")
    assert 19 <= killed_at < steps, (killed_at, proc.stderr.read())
    # the last complete checkpoint is there; a kill inside a write may leave its temporary file, which no
    # signal handler can remove after SIGKILL: the rerun's first write replaces it (the listing at the end)
    assert (tmp_path / "r.db.ckpt").exists()
    res = run_sdelip(*args)  # the very same command
    assert res.returncode == 0, res.stderr
    assert "resumed at step" in res.stdout
    # the record is the uninterrupted run's, bit for bit; the rows past the checkpoint were replaced
    assert main(["track", "--record", str(tmp_path / "ref.db"), "--steps", str(steps), "--lr", "0.05", *TINY]) == 0
    assert records_equal(tmp_path / "r.db", tmp_path / "ref.db")
    assert load_metadata(tmp_path / "r.db")["resumed_at"]
    # closed: one self-contained file, no log, no lock
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("r.db")) == ["r.db", "r.db.ckpt"]




def test_disk_full_while_writing_a_checkpoint(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt)
    tracked_steps(tr, model, opt, 2)
    with _tmpfs("256k") as disk:
        ckpt = disk / "c.pt"
        tr.checkpoint(ckpt)  # a small one fits
        before = ckpt.read_bytes()
        with pytest.raises(CheckpointWriteError, match=r"c\.pt.* failed: the disk holding .* is full .*unchanged"):
            tr.checkpoint(ckpt, extra={"big": torch.zeros(300_000)})  # 1.2 MB does not
        assert sorted(p.name for p in disk.iterdir()) == ["c.pt"]  # no .tmp left behind
        assert ckpt.read_bytes() == before
        with pytest.raises(CheckpointWriteError, match="is full"):
            save_checkpoint(disk / "other.pt", {"format": "x", "w": torch.zeros(300_000)})
        assert sorted(p.name for p in disk.iterdir()) == ["c.pt"]
        # sdelip track with its checkpoint on the full disk (the MLP's is about 2 MB): a clear error
        err = run_sdelip("track", "--record", tmp_path / "r.db", "--checkpoint", disk / "run.ckpt", "--steps", "3",
                      *TINY).stderr
        assert "run.ckpt" in err and "is full" in err and "Traceback" not in err, err
        assert sorted(p.name for p in disk.iterdir()) == ["c.pt"]


# ---------------------------------------------------------------------------------------------------------------
# 10. clear messages naming the path
def test_files_that_are_not_records_are_named(tmp_path, capsys):
    good = tmp_path / "good.db"
    write_record(good, 30)
    data = good.read_bytes()
    (tmp_path / "cut.db").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.db").write_bytes(os.urandom(3000))
    (tmp_path / "empty.db").write_bytes(b"")
    (tmp_path / "folder.db").mkdir()
    expected = {"cut.db": "not a readable sdelip record", "junk.db": "not an SQLite database",
                "empty.db": "empty file", "folder.db": "is a directory"}
    for name, what in expected.items():
        for cmd in ("info", "predict", "simulate"):
            assert main([cmd, str(tmp_path / name), "--no-progress"] if cmd == "simulate"
                        else [cmd, str(tmp_path / name)]) == 2
            err = capsys.readouterr().err
            assert name in err and what in err, (cmd, name, err)
    # a record without rows
    model = tiny_model()
    Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1), record=tmp_path / "zero.db").close()
    assert main(["info", str(tmp_path / "zero.db")]) == 0
    assert "rows: 0 (no step recorded yet)" in capsys.readouterr().out
    for cmd in ("predict", "simulate", "plot"):
        assert main([cmd, str(tmp_path / "zero.db")]) == 2
        err = capsys.readouterr().err
        assert "zero.db" in err and "holds no steps" in err, (cmd, err)


def test_output_paths_are_checked_before_the_work(tmp_path, capsys):
    good = tmp_path / "good.db"
    write_record(good, 6)
    start = time.perf_counter()
    assert main(["simulate", str(good), "--csv", "/missing/dir/x.csv", "-n", "200000", "--no-progress"]) == 2
    assert time.perf_counter() - start < 5  # refused before the simulation
    assert "/missing/dir" in capsys.readouterr().err
    assert main(["plot", str(good), "--out", "/missing/dir/x.png"]) == 2
    assert "/missing/dir" in capsys.readouterr().err and not Path("/missing").exists()
    assert main(["predict", str(good), "--csv", "/missing/dir/x.csv"]) == 2
    assert "/missing/dir" in capsys.readouterr().err


def test_track_threads_flag(tmp_path, capsys):
    assert main(["track", "--record", str(tmp_path / "r.db"), "--steps", "2", "--threads", "1", *TINY]) == 0
    assert load_metadata(tmp_path / "r.db")["torch_threads"] == 1
    with pytest.raises(SystemExit):
        main(["track", "--record", str(tmp_path / "s.db"), "--threads", "0", *TINY])
    assert "--threads must be at least 1" in capsys.readouterr().err
