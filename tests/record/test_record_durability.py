"""Records under faults (issue 18): one writer per record, read-only readers, foreign and damaged files.

Where a test needs to take away write access it uses, in this order, what the machine
allows: a read-only bind mount (root with CAP_SYS_ADMIN), a process running as the user
``nobody`` (root without mounts), or plain ``chmod`` (not root: permissions then bind).
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

from sdelip.cli import main
from sdelip.record import NotARecordError, RecordLockedError, copy_record, load_metadata, load_record
from sdelip.tracking.options import RecordOptions
from sdelip.tracking.tracker import Tracker

from faults import ENV, TINY, tiny_model, tracked_steps, run_sdelip, write_record


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
        res = run_sdelip("track", "--record", rec, "--steps", "3", "--lr", "0.2", *TINY)
        assert res.returncode == 2
        assert f"{rec}" in res.stderr and f"process {holder.pid} on host" in res.stderr, res.stderr
        # another Tracker in this process, also with overwrite=True
        model = tiny_model()
        for kw in ({}, {"overwrite": True}):
            with pytest.raises(RecordLockedError, match=rf"being written by another writer \(process {holder.pid}"):
                Tracker(model, torch.optim.SGD(model.parameters(), lr=0.2), record=rec, **kw)
        # the holder's record is untouched: its metadata is its own
        assert load_metadata(rec)["lr"] == 0.01
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): its lock went with it, a new writer is let in
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with Tracker(model, opt, record=RecordOptions(rec, mode="overwrite")) as tr:
        tracked_steps(tr, model, opt, 2)
        with pytest.raises(RecordLockedError):  # and two Trackers in one process exclude each other too
            Tracker(model, opt, record=RecordOptions(rec, mode="overwrite"))
    assert not (tmp_path / "r.db.lock").exists()


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


@pytest.mark.slow
def test_closed_record_is_one_file_readable_read_only(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    write_record(folder / "r.db", 5)
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
    tr = write_record(tmp_path / "live.db", 4, close=False)
    copy_record(tmp_path / "live.db", tmp_path / "snap.db")
    assert len(load_record(tmp_path / "snap.db")) == 4
    tr.close()


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
    model = tiny_model()
    for path, msg in ((foreign, r"other\.sqlite.* is an SQLite database of another program, .*customers"),
                      (junk, r"junk\.db.* is not an sdelip record: it is not an SQLite database")):
        for kw in ({}, {"overwrite": True}):
            with pytest.raises(NotARecordError, match=msg):
                Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1), record=path, **kw)
    assert foreign.read_bytes() == before and not Path(str(foreign) + "-wal").exists()
    with sqlite3.connect(foreign) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.db", "other.sqlite"]  # no lock files left
