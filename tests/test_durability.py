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

from sdelip.tracking.checkpoint import CheckpointWriteError, UnsafeCheckpointError, save_checkpoint
from sdelip.cli import main
from sdelip.record import NotARecordError, RecordLockedError, copy_record, load_metadata, load_record, records_equal
from sdelip.tracking.tracker import CHECKPOINT_FORMAT, Tracker

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
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02" + bytes((i * 37 + 11) % 256 for i in range(300)))  # garbage pickle
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
    from sdelip.tracking.tracker import Tracker
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


# ---------------------------------------------------------------------------------------------------------------
# 3. the plain rerun of a killed `sdelip track` continues it; a full disk during a checkpoint
def _rows(rec) -> int:
    try:
        con = sqlite3.connect(f"file:{rec}?mode=ro", uri=True)
        try:
            return con.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


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
    res = _sdelip(*args)  # the very same command
    assert res.returncode == 0, res.stderr
    assert "resumed at step" in res.stdout
    # the record is the uninterrupted run's, bit for bit; the rows past the checkpoint were replaced
    assert main(["track", "--record", str(tmp_path / "ref.db"), "--steps", str(steps), "--lr", "0.05", *TINY]) == 0
    assert records_equal(tmp_path / "r.db", tmp_path / "ref.db")
    assert load_metadata(tmp_path / "r.db")["resumed_at"]
    # closed: one self-contained file, no log, no lock
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("r.db")) == ["r.db", "r.db.ckpt"]


@contextlib.contextmanager
def _tmpfs(size: str):
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


def test_disk_full_while_writing_a_checkpoint(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt)
    _steps(tr, model, opt, 2)
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
        err = _sdelip("track", "--record", tmp_path / "r.db", "--checkpoint", disk / "run.ckpt", "--steps", "3",
                      *TINY).stderr
        assert "run.ckpt" in err and "is full" in err and "Traceback" not in err, err
        assert sorted(p.name for p in disk.iterdir()) == ["c.pt"]


# ---------------------------------------------------------------------------------------------------------------
# 4. a closed record is one file; readers only read (read-only mounts, users who may not write the folder)
@contextlib.contextmanager
def _read_only_view(folder: Path):
    """(how, path, run) with ``path`` a read-only view of ``folder`` and ``run(code)`` a reader process there.

    A read-only bind mount where mounting is allowed; else, as root, the reader runs as
    ``nobody`` on a chmod 555 copy; else (not root) a chmod 555 folder binds the reader.
    """
    view = Path(tempfile.mkdtemp(prefix="sdelip-ro-"))
    os.chmod(view, 0o755)
    mounted = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True).returncode == 0
    if mounted and subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True).returncode:
        subprocess.run(["umount", str(view)])
        mounted = False
    user = None
    if not mounted:
        shutil.rmtree(view)
        shutil.copytree(folder, view)
        for p in view.iterdir():
            os.chmod(p, 0o444)
        os.chmod(view, 0o555)
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody").pw_uid

    def run(code: str):
        def drop():
            if user is not None:
                os.setgid(user)
                os.setuid(user)
        try:
            return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                                  preexec_fn=drop, cwd="/")
        except PermissionError as exc:  # the interpreter lives where nobody may not go (e.g. under /root)
            pytest.skip(f"no read-only mount here and user nobody cannot run {sys.executable} ({exc})")

    how = "read-only bind mount" if mounted else ("user nobody, chmod 555" if user is not None else "chmod 555")
    try:
        yield how, view, run
    finally:
        if mounted:
            subprocess.run(["umount", str(view)], check=True)
            view.rmdir()
        else:
            os.chmod(view, 0o755)
            shutil.rmtree(view)


READ = "from sdelip.record import load_record; import sys; print(len(load_record(sys.argv[1] if len(sys.argv) > 1 " \
       "else {path!r})))"


def _write_record(path: Path, n: int, close: bool = True):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=path)
    _steps(tr, model, opt, n)
    if close:
        tr.close()
    return tr


def test_closed_record_is_one_file_readable_read_only(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    _write_record(folder / "r.db", 5)
    assert sorted(p.name for p in folder.iterdir()) == ["r.db"]  # no -wal, -shm or lock file
    shutil.copy(folder / "r.db", tmp_path / "copy.db")  # the file alone holds every row
    assert len(load_record(tmp_path / "copy.db")) == 5
    # a record left in WAL mode by an older sdelip (or a writer that exited without close())
    shutil.copy(folder / "r.db", folder / "old.db")
    with contextlib.closing(sqlite3.connect(folder / "old.db")) as con:
        con.execute("PRAGMA journal_mode=WAL")
    assert sorted(p.name for p in folder.iterdir()) == ["old.db", "r.db"]
    with _read_only_view(folder) as (how, view, run):
        res = run(READ.format(path=str(view / "r.db")) + "; print(len(load_record(" + repr(str(view / "old.db")) + ")))")
        assert res.returncode == 0 and res.stdout.split() == ["5", "5"], (how, res.stderr)
        res = run(f"from sdelip.cli import main; raise SystemExit(main(['info', {str(view / 'r.db')!r}]))")
        assert res.returncode == 0 and "rows: 5" in res.stdout, (how, res.stderr)
        # writing there is refused with a message naming the folder
        res = run("import torch; from torch import nn; from sdelip.tracking.tracker import Tracker; "
                  "m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)); "
                  f"Tracker(m, torch.optim.SGD(m.parameters(), lr=0.1), record={str(view / 'new.db')!r})")
        assert res.returncode != 0 and "is the folder" in res.stderr and "writable" in res.stderr, (how, res.stderr)


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import torch, torch.nn.functional as F
    from torch import nn
    from sdelip.tracking.tracker import Tracker
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=sys.argv[1])
    for k in range(7):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        opt.zero_grad(); tr.backward(F.cross_entropy(model(x), y, reduction="none")); opt.step()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_record_reads_read_only_and_copies_to_one_file(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    res = subprocess.run([sys.executable, str(script), str(folder / "r.db")], env=ENV, capture_output=True)
    assert res.returncode == -signal.SIGKILL
    assert (folder / "r.db-wal").exists()  # the rows sit in the log
    with _read_only_view(folder) as (how, view, run):
        res = run(READ.format(path=str(view / "r.db")))
        assert res.returncode == 0 and res.stdout.strip() == "7", (how, res.stderr)
    # `sdelip copy` makes one self-contained file of it (also while a writer is running)
    assert main(["copy", str(folder / "r.db"), str(tmp_path / "snap.db")]) == 0
    assert not (tmp_path / "snap.db-wal").exists()
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(tmp_path / "snap.db", only / "snap.db")
    assert len(load_record(only / "snap.db")) == 7
    assert main(["copy", str(folder / "r.db"), str(tmp_path / "snap.db")]) == 2  # never overwrites


def test_live_record_copy_while_writing(tmp_path):
    tr = _write_record(tmp_path / "live.db", 4, close=False)
    copy_record(tmp_path / "live.db", tmp_path / "snap.db")
    assert len(load_record(tmp_path / "snap.db")) == 4
    tr.close()


# ---------------------------------------------------------------------------------------------------------------
# 6. start_step continues only the same run; a foreign SQLite file is never written
def test_start_step_refuses_changed_options_and_gaps(tmp_path):
    rec = tmp_path / "r.db"
    _write_record(rec, 5)
    model = _model()
    cases = [
        (dict(lr=0.2), r"lr=0.2 here, lr=0.1 in the record"),
        (dict(schedule=2), r"schedule='every 2 steps' here, schedule='every step' in the record"),
        (dict(engine="materialised", loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="none")),
         r"engine='materialised' here, engine='factored' in the record"),
        (dict(start_step=9), r"record ends at step 4, .* steps 5\.\.8 would be missing"),
    ]
    for kw, msg in cases:
        lr = kw.pop("lr", 0.1)
        kw.setdefault("start_step", 3)
        with pytest.raises(ValueError, match=msg):
            Tracker(model, torch.optim.SGD(model.parameters(), lr=lr), record=rec, **kw)
    assert load_record(rec)["step"].tolist() == [0, 1, 2, 3, 4]  # untouched
    # the same configuration continues, replacing the later rows with a notice
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"held 2 row\(s\) from step 3 on; they are replaced"):
        tr = Tracker(model, opt, record=rec, start_step=3)
    _steps(tr, model, opt, 3)
    tr.close()
    assert load_record(rec)["step"].tolist() == list(range(6))


def test_foreign_and_damaged_files_are_never_written(tmp_path):
    foreign = tmp_path / "other.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    con.execute("INSERT INTO customers VALUES (1, 'x')")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(5000))
    model = _model()
    for path, msg in ((foreign, r"other\.sqlite.* is an SQLite database of another program, .*customers"),
                      (junk, r"junk\.db.* is not an sdelip record: it is not an SQLite database")):
        for kw in ({}, {"overwrite": True}):
            with pytest.raises(NotARecordError, match=msg):
                Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1), record=path, **kw)
    assert foreign.read_bytes() == before and not Path(str(foreign) + "-wal").exists()
    with sqlite3.connect(foreign) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.db", "other.sqlite"]  # no lock files left


# ---------------------------------------------------------------------------------------------------------------
# 10. clear messages naming the path
def test_files_that_are_not_records_are_named(tmp_path, capsys):
    good = tmp_path / "good.db"
    _write_record(good, 30)
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
    model = _model()
    Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1), record=tmp_path / "zero.db").close()
    assert main(["info", str(tmp_path / "zero.db")]) == 0
    assert "rows: 0 (no step recorded yet)" in capsys.readouterr().out
    for cmd in ("predict", "simulate", "plot"):
        assert main([cmd, str(tmp_path / "zero.db")]) == 2
        err = capsys.readouterr().err
        assert "zero.db" in err and "holds no steps" in err, (cmd, err)


def test_output_paths_are_checked_before_the_work(tmp_path, capsys):
    good = tmp_path / "good.db"
    _write_record(good, 6)
    start = time.perf_counter()
    assert main(["simulate", str(good), "--csv", "/missing/dir/x.csv", "-n", "200000", "--no-progress"]) == 2
    assert time.perf_counter() - start < 5  # refused before the simulation
    assert "/missing/dir" in capsys.readouterr().err
    assert main(["plot", str(good), "--out", "/missing/dir/x.png"]) == 2
    assert "/missing/dir" in capsys.readouterr().err and not Path("/missing").exists()
    assert main(["predict", str(good), "--csv", "/missing/dir/x.csv"]) == 2
    assert "/missing/dir" in capsys.readouterr().err


def test_overflow_of_the_trackers_own_sums_is_said(tmp_path):
    from sdelip._checks import NonFiniteError

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-40)
    tr = Tracker(model, opt)
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)) * 1e20, torch.randint(0, 3, (8,))
    losses = F.cross_entropy(model(x), y, reduction="none")
    assert bool(torch.isfinite(losses).all())
    with pytest.raises(NonFiniteError, match=r"(?s)losses are finite .*Σ g_i² overflowed.*float32.*float64"):
        tr.backward(losses)
    tr.close()
    # in float64 the same step is tracked
    model = _model().double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-40)
    tr = Tracker(model, opt)
    rec = tr.backward(F.cross_entropy(model(x.double()), y, reduction="none"))
    assert rec is not None and all(torch.isfinite(torch.tensor(v)) for v in rec.network.values() if v is not None)


# ---------------------------------------------------------------------------------------------------------------
# 7. a damaged task folder of a sweep is run again, and named
def test_sweep_reruns_damaged_tasks_and_names_them(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    import sweep_tasks

    from sdelip.workbench.sweep import Task, run_sweep

    log, root = tmp_path / "calls.log", tmp_path / "sweep"
    tasks = [Task(name=f"x={x}", fn=sweep_tasks.with_record, config={"x": x, "log": str(log)}) for x in (1, 2, 3, 4)]
    first = run_sweep(tasks, root, workers=1, progress=False)
    assert first.ok
    d = {t.name: root / t.id for t in tasks}
    (d["x=1"] / "result.json").write_text("")  # empty
    text = (d["x=2"] / "result.json").read_text()
    (d["x=2"] / "result.json").write_text(text[: len(text) // 2])  # truncated
    db = (d["x=3"] / "record.db").read_bytes()
    (d["x=3"] / "record.db").write_bytes(db[: len(db) // 2])  # a truncated record of a complete task
    capsys.readouterr()
    again = run_sweep(tasks, root, workers=1, progress=False)
    err = capsys.readouterr().err
    assert again.ok and again.skipped == ("x=4",)
    assert [int(v) for v in log.read_text().split()] == [1, 2, 3, 4, 1, 2, 3]
    for name, what in (("x=1", "result.json is empty or truncated"), ("x=2", "result.json is empty or truncated"),
                       ("x=3", "record.db is damaged")):
        line = next(ln for ln in err.splitlines() if f"task {name!r}" in ln)
        assert what in line and "running it again" in line, line
    assert {k: r.value for k, r in again.results.items()} == {f"x={x}": {"y": x * x} for x in (1, 2, 3, 4)}
    assert len(sqlite3.connect(d["x=3"] / "record.db").execute("SELECT * FROM steps").fetchall()) == 200


# ---------------------------------------------------------------------------------------------------------------
# 8. everyday workflows: deepcopy with a tracker attached, a last batch of 1, gradient accumulation
def test_deepcopy_of_a_tracked_model_and_a_last_batch_of_one(tmp_path):
    from sdelip.tracking.tracker import SmallBatchWarning

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=tmp_path / "r.db")
    _steps(tr, model, opt, 2)
    ema = copy.deepcopy(model)  # EMA weights / best-model snapshot
    assert ema is not model and all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))
    with torch.no_grad():
        ema(torch.randn(4, 6))
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.mul_(0.9).add_(p, alpha=0.1)
    _steps(tr, model, opt, 2)
    # the last batch of an epoch holds one sample: not tracked, with a notice; the run goes on
    x, y = torch.randn(1, 6), torch.randint(0, 3, (1,))
    opt.zero_grad()
    with pytest.warns(SmallBatchWarning, match="step 4 has a mini-batch of M = 1"):
        assert tr.backward(F.cross_entropy(model(x), y, reduction="none")) is None
    opt.step()
    _steps(tr, model, opt, 1)
    tr.close()
    assert load_record(tmp_path / "r.db")["step"].tolist() == [0, 1, 2, 3, 5]
    assert copy.deepcopy(model) is not None  # also after close


def test_gradient_accumulation_is_refused_with_the_way_out():
    from sdelip.tracking.tracker import GradientAccumulationError

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt.zero_grad()
    tr.backward(F.cross_entropy(model(x[:8]), y[:8], reduction="none"))
    with pytest.raises(GradientAccumulationError, match=r"step 1 without optimizer.step\(\).*one forward pass"):
        tr.backward(F.cross_entropy(model(x[8:]), y[8:], reduction="none"))
    opt.step()
    assert tr.step == 1
    opt.zero_grad()  # the way out: the whole update's samples in one forward pass and one call
    tr.backward(F.cross_entropy(model(x), y, reduction="none"))
    opt.step()
    assert tr.step == 2 and tr.last.batch_size == 16


# ---------------------------------------------------------------------------------------------------------------
# 5. degenerate steps are reported and never silently drive info, predict or simulate
def test_degenerate_steps_are_reported_and_kept_out(tmp_path, capsys):
    from sdelip.analysis.prediction import predict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    nn.init.orthogonal_(model[0].weight)  # σ1 = σ2: spectral gap 0 at step 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "r.db"
    tr = Tracker(model, opt, record=rec, on_degenerate="ignore")
    _steps(tr, model, opt, 12)
    tr.close()
    df = load_record(rec)
    bad = df.loc[df["degenerate"], "step"].tolist()
    assert bad and bad[0] == 0
    # make the undefined terms of the flagged steps absurd, as a clamped gap can: they must not matter
    con = sqlite3.connect(rec)
    # (checksum = NULL: rows edited on purpose, read unchecked as rows of older records; issue 28)
    con.execute("UPDATE steps SET noise_curvature_Z = 1e3, checksum = NULL WHERE degenerate = 1")
    con.execute("UPDATE layer_steps SET noise_curvature = 1e3, checksum = NULL WHERE degenerate = 1")
    con.commit()
    con.close()
    df = load_record(rec)
    regular = df[~df["degenerate"]]
    pred = predict(df)
    assert pred.attrs["degenerate_steps"] == bad and pred["step"].iloc[0] == regular["step"].iloc[0]
    assert pred["K_mean"].max() < 10 * df["K"].max()  # the 1e3 would give e^(1e3 t)
    assert predict(df, degenerate="include")["K_mean"].iloc[-1] > 1e3 * df["K"].iloc[-1]
    for cmd in (["info", str(rec)], ["predict", str(rec)], ["simulate", str(rec), "-n", "50", "--no-progress"]):
        assert main(cmd) == 0
        out = capsys.readouterr()
        text = out.out + out.err
        assert f"{len(bad)} of {len(df)} steps are degenerate" in text or f"degenerate steps: {len(bad)}" in text, text
        if cmd[0] == "info":
            assert "leave them out" in text and "1000" not in text and "1e+03" not in text
        if cmd[0] == "simulate":
            assert "not used by the simulation" in text
            k = [ln for ln in out.out.splitlines() if ln.strip()][-1].split()  # last row: t, E[K] ...
            assert float(k[1]) < 10 * df["K"].max()


# ---------------------------------------------------------------------------------------------------------------
# 9. threads: --threads, and a default that uses only the idle cores
def test_default_threads_use_the_idle_cores(monkeypatch):
    from sdelip.tracking.threads import default_threads, use_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert default_threads(load=0.1, cores=8) == 8  # quiet
    assert default_threads(load=2.2, cores=8) == 6
    assert default_threads(load=2.4, cores=2) == 1  # two busy processes on two cores
    assert default_threads(load=9.0, cores=4) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit choice wins
    assert default_threads(load=9.0, cores=4) == 3
    monkeypatch.undo()
    before = torch.get_num_threads()
    with use_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive integer"):
        with use_threads(0):
            pass


def test_track_threads_flag(tmp_path, capsys):
    assert main(["track", "--record", str(tmp_path / "r.db"), "--steps", "2", "--threads", "1", *TINY]) == 0
    assert load_metadata(tmp_path / "r.db")["torch_threads"] == 1
    with pytest.raises(SystemExit):
        main(["track", "--record", str(tmp_path / "s.db"), "--threads", "0", *TINY])
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_train_holds_the_record_until_its_final_checkpoint_is_written(tmp_path, monkeypatch):
    import importlib

    from sdelip.record.lock import RecordLock

    train_mod = importlib.import_module("sdelip.workbench.train")  # the module (sdelip.workbench.train is also the function)

    rec, seen = tmp_path / "r.db", []
    real = train_mod._save_checkpoint

    def save(path, config, *args):
        try:
            RecordLock(rec).release()
            seen.append("free")
        except RecordLockedError:
            seen.append("held")
        return real(path, config, *args)

    monkeypatch.setattr(train_mod, "_save_checkpoint", save)
    cfg = train_mod.TrainConfig(model="mlp", dataset="mnist-embedded", batch_size=8, steps=3, max_train_samples=64,
                                eval_test=False, record=str(rec), checkpoint=str(tmp_path / "c.pt"))
    train_mod.train(cfg, progress=False)
    assert seen and set(seen) == {"held"}  # the first, the periodic and the final checkpoint
    assert not (tmp_path / "r.db.lock").exists()


def test_a_skipped_optimizer_step_after_zero_grad_is_not_accumulation():
    """A GradScaler skips optimizer.step() on an overflow; the loop still zeroes the gradients: allowed."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt.zero_grad()
    tr.backward(F.cross_entropy(model(x[:8]), y[:8], reduction="none"))
    opt.zero_grad()  # the step was skipped, the gradients discarded
    rec = tr.backward(F.cross_entropy(model(x[8:]), y[8:], reduction="none"))
    opt.step()
    assert tr.step == 2 and rec is not None and rec.step == 1
