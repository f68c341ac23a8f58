"""Task functions for tests/workbench/test_sweep.py (top-level functions of an importable module, as sweeps need)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path


def square(config: dict, workdir: Path) -> dict:
    """Write ``out.txt`` and ``sub/x.json`` into ``workdir``, log the call, and return ``{"y": x²}``.

    Config keys: ``x`` (number), ``log`` (a file outside the sweep; one line per call),
    ``fail`` (raise ValueError), ``kill_flag`` (a path: when that file exists, the process
    kills itself with SIGKILL, as a sweep killed in the middle of this task).
    """
    with open(config["log"], "a") as fh:
        fh.write(f"{config['x']}\n")
    (Path(workdir) / "out.txt").write_text(f"x={config['x']}")
    if config.get("kill_flag") and Path(config["kill_flag"]).exists():
        os.kill(os.getpid(), signal.SIGKILL)
    if config.get("fail"):
        raise ValueError(f"boom at x={config['x']}")
    (Path(workdir) / "sub").mkdir()
    (Path(workdir) / "sub" / "x.json").write_text(json.dumps({"x": config["x"]}))
    return {"y": config["x"] ** 2}


def with_record(config: dict, workdir: Path) -> dict:
    """:func:`square`, plus an SQLite file ``record.db`` of 200 rows (as a tracker record in a task folder)."""
    import sqlite3

    out = square(config, workdir)
    con = sqlite3.connect(Path(workdir) / "record.db")
    con.execute("CREATE TABLE steps (step INTEGER PRIMARY KEY, value REAL, pad TEXT)")
    con.executemany("INSERT INTO steps VALUES (?, ?, ?)", [(k, k * config["x"], "x" * 200) for k in range(200)])
    con.commit()
    con.close()
    return out
