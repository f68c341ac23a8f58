"""Records and checkpoints, second round (issue 28): real processes, real files, flipped bytes, tmpfs mounts.

1. a closed record is self-contained, or says loudly that it is not;
2. one writer per file (symlinks, a deleted lock file), checkpoints name their record;
3. checksums of checkpoints and of record rows;
4. what is reported is there (a vanished record, a sweep task's files, one sweep per folder);
5. divergence is named; 6. messages name the path and the cause, SIGTERM like SIGINT,
an optimizer of another class refused.
"""

import contextlib
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from sdelip.cli import main
from sdelip.record import (DamagedRecordError, RecordLockedError, RecordNotClosedError, RecordWriteError,
                           load_record, load_record_id, records_equal)
from sdelip.tracking.checkpoint import CheckpointError
from sdelip.tracking.tracker import Tracker

from faults import ENV, ROOT, TINY, record_rows as _rows, run_sdelip as _sdelip, tiny_model as _model, \
    tmpfs as _tmpfs, tracked_steps as _steps






def _tracker(path, lr=0.1, optimizer=torch.optim.SGD, **kw):
    model = _model()
    opt = optimizer(model.parameters(), lr=lr)
    return Tracker(model, opt, record=path, **kw), model, opt






def _wait_for(cond, timeout=120.0, proc=None):
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def _alone(path: Path, tmp: Path) -> Path:
    """A copy of the file ``path`` alone (no -wal/-shm beside it), as mailed or uploaded."""
    folder = Path(tempfile.mkdtemp(dir=tmp))
    shutil.copy(path, folder / path.name)
    return folder / path.name


# A reader holding a read transaction (a notebook, an sqlite3 shell) until it is killed or `hold` seconds pass.
READER = textwrap.dedent(
    """
    import sqlite3, sys, time
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    con.execute("BEGIN")
    print(con.execute("SELECT COUNT(*) FROM steps").fetchone()[0], flush=True)
    time.sleep(float(sys.argv[2]))
    con.execute("COMMIT")
    """
)


def _reader(tmp_path, rec, hold):
    script = tmp_path / "reader.py"
    script.write_text(READER)
    proc = subprocess.Popen([sys.executable, str(script), str(rec), str(hold)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = int(proc.stdout.readline())
    return proc, seen


# ---------------------------------------------------------------------------------------------------------------
# 1. closing means self-contained
def test_close_waits_for_a_reader_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SDELIP_CLOSE_TIMEOUT_S", "30")
    rec = tmp_path / "r.db"
    tr, model, opt = _tracker(rec)
    _steps(tr, model, opt, 3)
    reader, seen = _reader(tmp_path, rec, 2.5)  # holds a snapshot of 3 rows for 2.5 s
    try:
        assert seen == 3
        _steps(tr, model, opt, 3)
        start = time.monotonic()
        with pytest.warns(UserWarning, match=r"closing the record .*r\.db.* waited \d+\.\d s for another connection"):
            tr.close()
        assert time.monotonic() - start >= 1.0
    finally:
        reader.kill()
        reader.wait()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("r.db")) == ["r.db"]
    assert len(load_record(_alone(rec, tmp_path))) == 6  # the file alone holds every row


def test_close_with_a_reader_that_never_lets_go_is_loud(tmp_path, monkeypatch):
    monkeypatch.setenv("SDELIP_CLOSE_TIMEOUT_S", "1")
    rec = tmp_path / "r.db"
    tr, model, opt = _tracker(rec)
    _steps(tr, model, opt, 3)
    reader, _ = _reader(tmp_path, rec, 600)
    try:
        _steps(tr, model, opt, 3)
        with pytest.warns(UserWarning, match="waited"), \
                pytest.raises(RecordNotClosedError, match=r"r\.db.* is not one self-contained file: another connection "
                                                          r".*r\.db-wal.*sdelip copy"):
            tr.close()
    finally:
        reader.kill()
        reader.wait()
    # the lock is released all the same, and `sdelip copy` finishes the job
    assert not (tmp_path / "r.db.lock").exists()
    assert main(["copy", str(rec), str(tmp_path / "one.db")]) == 0
    assert len(load_record(_alone(tmp_path / "one.db", tmp_path))) == 6


@pytest.mark.slow
def test_sdelip_track_never_exits_0_with_rows_only_in_the_log(tmp_path):
    rec = tmp_path / "r.db"
    env = {**ENV, "SDELIP_CLOSE_TIMEOUT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sdelip", "track", "--record", str(rec), "--steps", "40",
                             "--no-checkpoint", *TINY], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: _rows(rec) >= 2, proc=proc)
    reader, seen = _reader(tmp_path, rec, 600)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        reader.kill()
        reader.wait()
    assert seen < 40
    assert proc.returncode == 2, (out, err)
    assert f"{rec}" in err and "not one self-contained file" in err and "sdelip copy" in err, err
    assert _rows(rec) == 40  # with its log beside it, every step is there


# ---------------------------------------------------------------------------------------------------------------
# 2. one writer per file, not per spelling; checkpoints name their record
HOLDER = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    from sdelip.tracking.tracker import Tracker
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    tr = Tracker(model, torch.optim.SGD(model.parameters(), lr=0.01), record=sys.argv[1])
    print("holding", flush=True)
    time.sleep(120)
    """
)


def test_a_second_writer_through_a_symlink_or_after_the_lock_file_is_deleted_is_refused(tmp_path):
    rec = tmp_path / "r.db"
    (tmp_path / "alias.db").symlink_to(rec)
    script = tmp_path / "hold.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(rec)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RecordLockedError, match=rf"being written by another writer \(process {holder.pid}"):
            _tracker(tmp_path / "alias.db")
        res = _sdelip("track", "--record", tmp_path / "alias.db", "--overwrite", "--steps", "3", *TINY)
        assert res.returncode == 2 and f"process {holder.pid}" in res.stderr, res.stderr
        (tmp_path / "r.db.lock").unlink()  # the helper file deleted by hand
        for path in (rec, tmp_path / "alias.db"):
            for kw in ({}, {"overwrite": True}):
                with pytest.raises(RecordLockedError, match=r"\.db' is being written by another writer .*lock on "
                                                            r"the file itself"):
                    _tracker(path, **kw)
        assert rec.exists()  # overwrite did not delete the holder's record
    finally:
        holder.kill()
        holder.wait()
    tr, model, opt = _tracker(tmp_path / "alias.db", overwrite=True)  # the holder is gone: let in
    _steps(tr, model, opt, 2)
    tr.close()
    assert len(load_record(rec)) == 2


def test_a_checkpoint_is_refused_for_another_record(tmp_path):
    tr, model, opt = _tracker(tmp_path / "a.db")
    _steps(tr, model, opt, 3)
    tr.checkpoint(tmp_path / "a.ckpt")
    tr.close()
    other, m2, o2 = _tracker(tmp_path / "b.db")
    _steps(other, m2, o2, 5)
    other.close()
    rows_before = _rows(tmp_path / "b.db")
    model = _model()
    with pytest.raises(CheckpointError, match=r"a\.ckpt.* belongs to the record .*a\.db.*, not to .*b\.db"):
        Tracker.resume(tmp_path / "a.ckpt", model, torch.optim.SGD(model.parameters(), lr=0.1),
                       record=tmp_path / "b.db")
    assert _rows(tmp_path / "b.db") == rows_before  # nothing truncated
    assert load_record_id(tmp_path / "a.db") != load_record_id(tmp_path / "b.db")
    tr = Tracker.resume(tmp_path / "a.ckpt", model, torch.optim.SGD(model.parameters(), lr=0.1))  # its own: fine
    assert tr.step == 3
    tr.close()


@pytest.mark.slow
def test_two_runs_sharing_one_checkpoint_and_sigterm(tmp_path):
    shared = tmp_path / "shared.ckpt"
    args_a = ["track", "--record", tmp_path / "a.db", "--checkpoint", shared, "--steps", "120", "--lr", "0.05", *TINY]
    env = {**ENV, "SDELIP_CHECKPOINT_MIN_INTERVAL_S": "0.2"}
    a = subprocess.Popen([sys.executable, "-m", "sdelip", *map(str, args_a)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _rows(tmp_path / "a.db") >= 10, proc=a)
        # a second run with its own record and the same checkpoint, while the first runs: refused, holder named
        res = _sdelip("track", "--record", tmp_path / "b.db", "--checkpoint", shared, "--steps", "5", *TINY)
        assert res.returncode == 2 and "checkpoint" in res.stderr and f"process {a.pid}" in res.stderr, res.stderr
        assert not (tmp_path / "b.db").exists()
        # SIGTERM: a clean stop, a message, the record closed
        a.send_signal(signal.SIGTERM)
        out, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 143, err
    assert "terminated by SIGTERM" in err and "a.db" in err and "rerun the same command" in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("a.db")) == ["a.db"]
    assert not (tmp_path / "shared.ckpt.lock").exists()
    # the same command continues it, to the uninterrupted run's record
    res = _sdelip(*args_a, env=env)
    assert res.returncode == 0 and "resumed at step" in res.stdout, res.stderr
    assert main(["track", "--record", str(tmp_path / "ref.db"), "--no-checkpoint", "--steps", "120", "--lr", "0.05",
                 *TINY]) == 0
    assert records_equal(tmp_path / "a.db", tmp_path / "ref.db")
    # afterwards: the checkpoint belongs to a.db; another run is refused, and --overwrite does not delete it
    before = shared.read_bytes()
    for extra in ([], ["--overwrite"]):
        res = _sdelip("track", "--record", tmp_path / "b.db", "--checkpoint", shared, "--steps", "120", "--lr", "0.05",
                      *extra, *TINY)
        assert res.returncode == 2 and "belongs to another run" in res.stderr and "a.db" in res.stderr, res.stderr
        assert "--overwrite to" not in res.stderr
    assert shared.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# 3. checksums
def _flip_in_zip_entry(path: Path, entry_suffix: str) -> None:
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(entry_suffix))
    data = bytearray(path.read_bytes())
    local_extra = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + len(info.filename.encode()) + local_extra
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_one_flipped_byte_is_refused(tmp_path):
    tr, model, opt = _tracker(tmp_path / "r.db")
    _steps(tr, model, opt, 2)
    tr.checkpoint(tmp_path / "c.pt")
    tr.close()
    _flip_in_zip_entry(tmp_path / "c.pt", "data/0")
    model = _model()
    with pytest.raises(CheckpointError, match=r"c\.pt.* is damaged .*fails its CRC check"):
        Tracker.resume(tmp_path / "c.pt", model, torch.optim.SGD(model.parameters(), lr=0.1))
    # the training checkpoint through the command line
    assert main(["track", "--record", str(tmp_path / "t.db"), "--steps", "3", *TINY]) == 0
    _flip_in_zip_entry(tmp_path / "t.db.ckpt", "data/0")
    res = _sdelip("track", "--record", tmp_path / "t.db", "--steps", "6", *TINY)
    assert res.returncode == 2 and "t.db.ckpt" in res.stderr and "CRC" in res.stderr, res.stderr


def _flip_value(path: Path, value: float) -> None:
    """Flip one bit of the stored double ``value`` (SQLite stores doubles big-endian)."""
    data = bytearray(path.read_bytes())
    where = data.find(struct.pack(">d", value))
    assert where > 0
    data[where + 1] ^= 0x40  # an exponent bit: the value reads as ~1e19 times itself
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_stored_value_is_named(tmp_path):
    rec = tmp_path / "r.db"
    tr, model, opt = _tracker(rec)
    _steps(tr, model, opt, 10)
    tr.close()
    K5 = float(load_record(rec)["K"][5])
    _flip_value(rec, K5)
    with pytest.raises(DamagedRecordError, match=r"r\.db.* is damaged: rows of steps fail their checksum at step\(s\) "
                                                 r"5;.*intact_only=True"):
        load_record(rec)
    with pytest.warns(UserWarning, match=r"step\(s\) 5.*intact rows only \(1 step"):
        df = load_record(rec, intact_only=True)
    assert df["step"].tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    for cmd in ("info", "predict"):
        res = _sdelip(cmd, rec)
        assert res.returncode == 2 and "r.db" in res.stderr and "step(s) 5" in res.stderr, res.stderr
        res = _sdelip(cmd, rec, "--intact-only")
        assert res.returncode == 0 and "inf" not in res.stdout, res.stderr


def test_a_truncated_record_is_named(tmp_path):
    rec = tmp_path / "r.db"
    tr, model, opt = _tracker(rec)
    _steps(tr, model, opt, 40)
    tr.close()
    data = rec.read_bytes()
    rec.write_bytes(data[:-248])
    with pytest.raises(DamagedRecordError, match=r"r\.db.* is damaged: the file is \d+ bytes.*cut short"):
        load_record(rec)
    for cmd in ("info", "predict"):
        res = _sdelip(cmd, rec)
        assert res.returncode == 2 and "r.db" in res.stderr and "cut short" in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------------------------
# 4. what is reported is there
def test_a_record_deleted_during_the_run_fails_with_its_path(tmp_path):
    rec = tmp_path / "r.db"
    tr, model, opt = _tracker(rec)
    _steps(tr, model, opt, 3)
    rec.unlink()
    with pytest.raises(RecordWriteError, match=r"the record .*r\.db.* was deleted while this run was writing it"):
        _steps(tr, model, opt, 1)
    with pytest.raises(RecordWriteError, match="was deleted"):
        tr.close()
    # a real process: `sdelip track` whose record is deleted under it
    proc = subprocess.Popen([sys.executable, "-m", "sdelip", "track", "--record", str(tmp_path / "t.db"), "--steps",
                             "300", *TINY], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _rows(tmp_path / "t.db") >= 3, proc=proc)
    (tmp_path / "t.db").unlink()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "t.db" in err and "was deleted" in err, (out, err)
    assert "record:" not in out


SLOW_TASKS = textwrap.dedent(
    """
    import time
    from pathlib import Path

    def sleepy(config, workdir):
        (Path(workdir) / "record.db").write_bytes(b"x" * 100)
        Path(config["started"]).write_text("1")
        time.sleep(config["s"])
        return {"y": 1}
    """
)


def test_a_sweep_task_with_a_missing_file_is_run_again_and_two_sweeps_exclude_each_other(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    import sweep_tasks

    from sdelip.workbench.sweep import Task, run_sweep

    log, root = tmp_path / "calls.log", tmp_path / "sweep"
    tasks = [Task(name=f"x={x}", fn=sweep_tasks.with_record, config={"x": x, "log": str(log)}) for x in (1, 2)]
    assert run_sweep(tasks, root, workers=1, progress=False).ok
    (root / tasks[0].id / "record.db").unlink()  # result.json intact
    capsys.readouterr()
    again = run_sweep(tasks, root, workers=1, progress=False)
    err = capsys.readouterr().err
    assert again.ok and again.skipped == ("x=2",)
    assert "record.db is missing" in err and "running it again" in err, err
    assert (root / tasks[0].id / "record.db").exists()
    # a second sweep on the same folder while one runs: refused, naming the holder
    (tmp_path / "slow_tasks.py").write_text(SLOW_TASKS)
    started = tmp_path / "started"
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import slow_tasks; "
            "from sdelip.workbench.sweep import Task, run_sweep; "
            f"run_sweep([Task(name='s', fn=slow_tasks.sleepy, config={{'s': 60, 'started': {str(started)!r}}})], "
            f"{str(root)!r}, workers=1, progress=False)")
    holder = subprocess.Popen([sys.executable, "-c", code], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(started.exists, proc=holder)
        with pytest.raises(RecordLockedError, match=rf"sweep folder .*sweep.* another writer \(process {holder.pid}"):
            run_sweep(tasks, root, workers=1, progress=False)
        staging = list((root / ".staging").iterdir())
        assert len(staging) == 1  # the holder's staging folder is untouched
    finally:
        holder.kill()
        holder.wait()
    assert run_sweep(tasks, root, workers=1, progress=False).ok  # the holder died: let in


# ---------------------------------------------------------------------------------------------------------------
# 5. divergence is named
def test_a_diverging_run_is_named_and_never_printed_as_inf(tmp_path):
    rec = tmp_path / "d.db"
    res = _sdelip("track", "--record", rec, "--steps", "30", "--lr", "1000", *TINY)
    assert _rows(rec) >= 2, res.stderr
    df = load_record(rec)
    assert df.attrs["diverged_steps"], df["K"].tolist()  # the writer flagged them
    first = df.attrs["diverged_steps"][0]
    for cmd in ("info", "predict"):
        res = _sdelip(cmd, rec)
        assert res.returncode == 0, res.stderr
        assert f"the run diverged at step {first}" in res.stderr and "--include-diverged" in res.stderr, res.stderr
        assert "inf" not in res.stdout and "overflow" not in res.stderr, res.stdout
    # a record whose K explodes to 3e36 (the flag recomputed for an older record without it)
    with contextlib.closing(sqlite3.connect(rec)) as con:
        con.execute("ALTER TABLE steps DROP COLUMN diverged")
        con.execute("ALTER TABLE steps DROP COLUMN checksum")
        con.commit()
    res = _sdelip("predict", rec)
    assert res.returncode == 0 and f"the run diverged at step {first}" in res.stderr, res.stderr
    res = _sdelip("predict", rec, "--include-diverged")
    assert "--include-diverged" in res.stderr
    assert res.returncode != 0 or "inf" not in res.stdout, res.stdout


# ---------------------------------------------------------------------------------------------------------------
# 6. messages name the path and the cause; an optimizer of another class is refused


def test_disk_full_during_record_writes_is_named(tmp_path):
    with _tmpfs("256k") as disk:
        tr, model, opt = _tracker(disk / "r.db")
        with pytest.raises(RecordWriteError, match=r"writing .* the record .*r\.db.* failed: the disk holding .* is "
                                                   r"full"):
            _steps(tr, model, opt, 500)
        written = tr.step
        with contextlib.suppress(RecordWriteError):
            tr.close()
        assert 0 < written < 500


LOCKER = textwrap.dedent(
    """
    import sqlite3, sys, time
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_another_program_holding_the_write_lock_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SDELIP_SQLITE_TIMEOUT_S", "1")
    monkeypatch.setenv("SDELIP_CLOSE_TIMEOUT_S", "1")
    rec = tmp_path / "r.db"
    tr, model, opt = _tracker(rec)
    _steps(tr, model, opt, 2)
    (tmp_path / "locker.py").write_text(LOCKER)
    locker = subprocess.Popen([sys.executable, str(tmp_path / "locker.py"), str(rec)], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        with pytest.raises(RecordWriteError, match=r"writing step 2 to the record .*r\.db.* failed: another program "
                                                   r"holds SQLite's lock on the file .*waited 1 s"):
            _steps(tr, model, opt, 1)
    finally:
        locker.kill()
        locker.wait()
    tr.close()
    assert len(load_record(rec)) == 2


def test_copy_into_a_missing_folder_blames_the_destination(tmp_path, capsys):
    tr, model, opt = _tracker(tmp_path / "r.db")
    _steps(tr, model, opt, 2)
    tr.close()
    assert main(["copy", str(tmp_path / "r.db"), str(tmp_path / "missing_dir" / "x.db")]) == 2
    err = capsys.readouterr().err
    assert "missing_dir" in err and "does not exist" in err and "not an sdelip record" not in err, err


def test_resuming_into_another_optimizer_class_is_refused(tmp_path):
    tr, model, opt = _tracker(tmp_path / "r.db")
    _steps(tr, model, opt, 2)
    tr.checkpoint(tmp_path / "c.pt")
    tr.close()
    model = _model()
    with pytest.raises(CheckpointError, match=r"c\.pt.* holds the state of a torch\.optim\.sgd\.SGD optimizer, and "
                                              r"this run's optimizer is a torch\.optim\.adam\.Adam"):
        Tracker.resume(tmp_path / "c.pt", model, torch.optim.Adam(model.parameters(), lr=0.1))
    # a checkpoint without the class name (older): told by the hyper-parameters
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state["tracker"].pop("optimizer_class")
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"old\.pt.* another optimizer class .*'dampening'"):
        Tracker.resume(tmp_path / "old.pt", model, torch.optim.Adam(model.parameters(), lr=0.1))
