"""Damage and divergence in records: per-row checksums, truncation, and the divergence flag.

SQLite keeps no checksum of the values it stores: a flipped bit in a stored float reads
as another number, and a file cut short can read as fewer rows or zeros. A record
therefore carries, in every row of ``steps``, ``layer_steps`` and ``probes``, a
``checksum`` column: a 64-bit BLAKE2b hash of the row's other non-NULL values with their
column names (:func:`row_checksum`), computed by the writer. Readers
(:func:`sdelip.record.load_record`, and through it ``sdelip info``/``predict``, and a
sweep's cache check) recompute it (:func:`damaged_steps`) and check the file's length
against the size its header states (:func:`truncation`); a damaged record is refused
by name with the steps concerned (:class:`DamagedRecordError`), unless the reader asks
for what is intact (``load_record(path, intact_only=True)``, ``--intact-only``). Rows
of records written before the column existed have no checksum (NULL) and are read as
before. Because the hash covers the non-NULL values by name, columns added later (NULL
in older rows) do not change it.

Divergence: the writer flags a step ``diverged`` (:func:`is_diverged`) when its K or
its loss is non-finite, or has grown by :data:`DIVERGENCE_FACTOR` (10⁶) or more over
the record's first row. Such rows are kept (they are what happened) and
``sdelip info``/``predict`` leave the steps from the first diverged one on out by
default, saying so (:func:`diverged_steps`, which applies the same rule to records
written before the flag and to in-memory histories).
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import struct
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from ..errors import DamagedRecordError  # noqa: F401  (defined there, re-exported)
from .format import NotARecordError

__all__ = ["DIVERGENCE_FACTOR", "DamagedRecordError", "row_checksum", "is_diverged", "diverged_steps",
           "damaged_steps", "truncation", "describe_damage"]

#: A step is flagged diverged when its K or its loss is at least this many times the record's first row's.
DIVERGENCE_FACTOR = 1e6

#: The tables whose rows carry a ``checksum`` column, and the column naming a row's step.
CHECKED_TABLES = ("steps", "layer_steps", "probes")




def _encode(value) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, str):
        return b"S" + value.encode()
    if isinstance(value, bytes):
        return b"B" + value
    return b"F" + struct.pack("<d", float(value))


def row_checksum(row: Mapping[str, object]) -> int:
    """The checksum of a row: BLAKE2b-64 of its non-NULL values by column name (``checksum`` itself left out)."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(row):
        value = row[name]
        if name == "checksum" or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        h.update(name.encode() + b"=" + _encode(value) + b";")
    return int.from_bytes(h.digest(), "little", signed=True)


def is_diverged(K: Optional[float], loss: Optional[float], first_K: Optional[float],
                first_loss: Optional[float]) -> bool:
    """Whether a step's K or loss is non-finite or at least :data:`DIVERGENCE_FACTOR` times the first row's."""
    for v, first in ((K, first_K), (loss, first_loss)):
        if v is None or math.isnan(float(v)):  # NULL: not measured
            continue
        v = float(v)
        if not math.isfinite(v):
            return True
        if first is not None and math.isfinite(float(first)) and abs(float(first)) > 0 \
                and abs(v) >= DIVERGENCE_FACTOR * abs(float(first)):
            return True
    return False


def diverged_steps(df) -> list[int]:
    """The steps of a record (a :func:`~sdelip.record.load_record` DataFrame) whose K or loss diverged.

    The writer's flags (``df.attrs["diverged_steps"]``) where the record has them, and the
    same rule (:func:`is_diverged`, against the first row) for every row.
    """
    import numpy as np

    if df is None or len(df) == 0:
        return []
    steps = df["step"].to_numpy()
    flagged = set(df.attrs.get("diverged_steps", ()))
    K = df["K"].to_numpy(dtype=float) if "K" in df else np.full(len(df), np.nan)
    loss = df["loss"].to_numpy(dtype=float) if "loss" in df else np.full(len(df), np.nan)
    K0, l0 = (None if math.isnan(K[0]) else float(K[0])), (None if math.isnan(loss[0]) else float(loss[0]))
    return [int(s) for s, k, v in zip(steps, K, loss) if int(s) in flagged or is_diverged(k, v, K0, l0)]


def _columns(con: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in con.execute(f"PRAGMA table_info({table})")]


def damaged_steps(con: sqlite3.Connection) -> dict[str, list[int]]:
    """table → the steps whose rows there fail their checksum (rows without one are not checked)."""
    out: dict[str, list[int]] = {}
    for table in CHECKED_TABLES:
        cols = _columns(con, table)
        if "checksum" not in cols:
            continue
        bad = set()
        for values in con.execute(f"SELECT * FROM {table} WHERE checksum IS NOT NULL"):
            row = dict(zip(cols, values))
            if row_checksum(row) != row["checksum"]:
                step = row.get("step")
                bad.add(int(step) if isinstance(step, (int, float)) and math.isfinite(step) else -1)
        if bad:
            out[table] = sorted(bad)
    return out


def truncation(path: Union[str, os.PathLike]) -> Optional[str]:
    """Why the file is shorter than its SQLite header says (None when it is not)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(100)
        size = p.stat().st_size
    except OSError:
        return None
    if len(head) < 100:
        return f"the file is {size} bytes, shorter than an SQLite header"
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    change, pages, valid_for = (int.from_bytes(head[i:i + 4], "big") for i in (24, 28, 92))
    if pages and change == valid_for and size < pages * page_size:
        return f"the file is {size} bytes, but its header says {pages} pages of {page_size} bytes " \
               f"({pages * page_size} bytes): it was cut short"
    if page_size and size % page_size:
        return f"the file is {size} bytes, not a whole number of {page_size}-byte pages: it was cut short"
    return None


def _shown(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps[:10])) + (f", … ({len(steps)} in all)" if len(steps) > 10 else "")


def describe_damage(path, bad: Mapping[str, Iterable[int]], cut: Optional[str]) -> Optional[str]:
    """One sentence naming the record, the damaged steps and the truncation (None when sound)."""
    parts = []
    if cut:
        parts.append(cut)
    for table, steps in bad.items():
        steps = list(steps)
        parts.append(f"rows of {table} fail their checksum at step(s) {_shown(steps)}")
    if not parts:
        return None
    return f"the record {str(path)!r} is damaged: " + "; ".join(parts)
