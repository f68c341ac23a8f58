"""The record writer: one SQLite transaction per tracked step, one writer per file (see :mod:`sdelip.record`)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union


from .format import (
    LAYER_QUANTITIES,
    NETWORK_QUANTITIES,
    NotARecordError,
    RecordExistsError,
    StepRecord,
    _ADDED_COLUMNS,
    _LAYER_DB_COLUMNS,
    _SCHEMA,
    _STEP_DB_COLUMNS,
    _json_default,
    _opt_float,
    _table_columns,
    remove_record,
)
from .lock import RecordLock, RecordLockedError
from .read import (  # noqa: F401  (the readers are part of this module's interface)
    check_record_file,
    record_steps,
    copy_record,
    load_record,
    load_metadata,
    load_probes,
    load_layers,
    load_layer_uses,
    records_equal,
)

__all__ = [
    "LAYER_QUANTITIES",
    "NETWORK_QUANTITIES",
    "StepRecord",
    "RecordWriter",
    "RecordExistsError",
    "NotARecordError",
    "RecordLockedError",
    "check_record_file",
    "record_steps",
    "copy_record",
    "load_record",
    "load_metadata",
    "load_probes",
    "load_layers",
    "load_layer_uses",
    "remove_record",
    "records_equal",
]


def _connect(path: Union[str, os.PathLike]) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
    return con


def _update_values(update: Optional[Mapping[str, Any]]) -> tuple:
    """The :data:`~sdelip.record.format.UPDATE_COLUMNS` of a step (NULL, 1, NULL when not observed)."""
    u = update or {}
    return (_opt_float(u.get("grad_scale")), int(bool(u.get("update_modelled", True))),
            None if u.get("update_note") is None else str(u["update_note"]))


class RecordWriter:
    """Append-only writer of a record (SQLite, write-ahead log, one commit per step).

    Args:
        path: the database file (created with its parent folder if missing).
        layers: the tracked layers as (name, kind, (m, n)) or (name, kind, (m, n), uses)
            tuples, in forward order (uses: how many times the weight is applied, default 1).
        metadata: JSON-serialisable run metadata (stored under their keys).
        mode: ``"new"`` (refuse a file that already holds steps), ``"append"`` (continue
            an existing record with the same layers) or ``"overwrite"`` (delete the file first).
        durability: ``"process"`` (``synchronous=NORMAL``: a committed step survives the
            process being killed) or ``"power"`` (``synchronous=FULL``: also survives
            power loss; one fsync per step).

        lock: a :class:`~sdelip.record.lock.RecordLock` on ``path`` already held by the
            caller, who keeps it (and releases it) after the writer closes, e.g. to write a
            final checkpoint; by default the writer takes the lock and :meth:`close`
            releases it.

    Raises:
        RecordExistsError: ``mode="new"`` and the file already holds steps.
        RecordLockedError: another writer holds the record (named in the message).
        NotARecordError: the path is a directory, not an SQLite file, or an SQLite
            database of another program (also with ``mode="overwrite"``: only records
            are replaced).
        ValueError: ``mode="append"`` and the layers differ from the record's.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        layers: Sequence[tuple[str, str, tuple[int, int]]],
        metadata: Optional[Mapping[str, Any]] = None,
        mode: str = "new",
        durability: str = "process",
        lock: Optional[RecordLock] = None,
    ):
        if mode not in ("new", "append", "overwrite"):
            raise ValueError(f"mode must be 'new', 'append' or 'overwrite', got {mode!r}")
        if durability not in ("process", "power"):
            raise ValueError(f"durability must be 'process' or 'power', got {durability!r}")
        self.path = Path(path)
        self._con = None
        self._owns_lock = lock is None
        self._lock = lock if lock is not None else RecordLock(self.path)  # one writer per record
        try:
            check_record_file(self.path, for_writing=True)
            if mode == "overwrite":
                remove_record(self.path)
            self._con = _connect(self.path)
            con = self._con
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA synchronous={'FULL' if durability == 'power' else 'NORMAL'}")
            con.executescript(_SCHEMA)
            for table, cols in _ADDED_COLUMNS.items():
                have = _table_columns(con, table)
                for col, kind in cols:
                    if col not in have:
                        con.execute(f"ALTER TABLE {table} ADD COLUMN {col} {kind}")
            if "uses" not in _table_columns(con, "layers"):  # records written before tied weights were counted
                con.execute("ALTER TABLE layers ADD COLUMN uses INTEGER NOT NULL DEFAULT 1")
            layers = [tuple(layer) if len(layer) == 4 else (*layer, 1) for layer in layers]
            self.layer_names = [name for name, _, _, _ in layers]
            existing = con.execute("SELECT name, kind, m, n, uses FROM layers ORDER BY idx").fetchall()
            n_steps = con.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
            if mode == "new" and n_steps > 0:
                raise RecordExistsError(
                    f"record {str(self.path)!r} already holds {n_steps} step(s); pass mode='overwrite' (a Tracker: "
                    "record=RecordOptions(path, mode='overwrite')) to start a new record there, or resume the run "
                    "from a checkpoint (Tracker.resume) to continue it"
                )
            wanted = [(name, kind, int(shape[0]), int(shape[1]), int(uses)) for name, kind, shape, uses in layers]
            if existing and [tuple(r) for r in existing] != wanted:
                if mode == "append" or n_steps > 0:

                    def desc(rows):
                        return [(r[0], (r[2], r[3])) + ((f"{r[4]} uses",) if r[4] != 1 else ()) for r in rows]

                    raise ValueError(
                        f"record {str(self.path)!r} tracks layers {desc(existing)}, not {desc(wanted)}"
                    )
            con.execute("BEGIN")
            if not existing or [tuple(r) for r in existing] != wanted:
                con.execute("DELETE FROM layers")
                con.executemany(
                    "INSERT INTO layers (idx, name, kind, m, n, uses) VALUES (?, ?, ?, ?, ?, ?)",
                    [(i, *w) for i, w in enumerate(wanted)],
                )
            if mode != "append":
                con.execute("DELETE FROM meta")
            if metadata:
                self._put_meta(metadata, overwrite=(mode != "append"))
            con.execute("COMMIT")
        except BaseException:
            self._release()
            raise
        self._layer_idx = {name: i for i, name in enumerate(self.layer_names)}

    # -- metadata ---------------------------------------------------------------------------
    def _put_meta(self, metadata: Mapping[str, Any], overwrite: bool = True) -> None:
        verb = "INSERT OR REPLACE" if overwrite else "INSERT OR IGNORE"
        self._con.executemany(
            f"{verb} INTO meta (key, value) VALUES (?, ?)",
            [(str(k), json.dumps(v, default=_json_default)) for k, v in metadata.items()],
        )

    def update_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Set (replace) metadata keys, committed immediately."""
        self._con.execute("BEGIN")
        self._put_meta(metadata, overwrite=True)
        self._con.execute("COMMIT")

    def metadata(self) -> dict:
        """The metadata currently stored."""
        return {k: json.loads(v) for k, v in self._con.execute("SELECT key, value FROM meta")}

    # -- steps ------------------------------------------------------------------------------
    def write(self, rec: StepRecord) -> None:
        """Write one step in a single committed transaction (durable once this returns)."""
        step_row = (
            int(rec.step), float(rec.t), float(rec.lr), _opt_float(rec.loss), int(rec.batch_size),
            *(_opt_float(rec.network.get(k)) for k in NETWORK_QUANTITIES), int(bool(rec.degenerate)),
            *_update_values(rec.update),
        )
        layer_rows = []
        for name, q in rec.layers.items():
            layer_rows.append(
                (int(rec.step), self._layer_idx[name], *(_opt_float(q.get(k)) for k in LAYER_QUANTITIES),
                 int(bool(q.get("degenerate", False))))
            )
        con = self._con
        con.execute("BEGIN")
        try:
            con.execute(f"INSERT INTO steps ({', '.join(_STEP_DB_COLUMNS)}) VALUES ({', '.join('?' * len(step_row))})",
                        step_row)
            con.executemany(
                f"INSERT INTO layer_steps (step, layer, {', '.join(_LAYER_DB_COLUMNS)}) "
                f"VALUES ({', '.join('?' * (2 + len(_LAYER_DB_COLUMNS)))})",
                layer_rows,
            )
            if rec.probes:
                con.executemany(
                    "INSERT OR REPLACE INTO probes (step, name, value) VALUES (?, ?, ?)",
                    [(int(rec.step), str(k), _opt_float(v)) for k, v in rec.probes.items()],
                )
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def write_probes(self, step: int, values: Mapping[str, float]) -> None:
        """Write probe values of a step (committed immediately)."""
        con = self._con
        con.execute("BEGIN")
        con.executemany(
            "INSERT OR REPLACE INTO probes (step, name, value) VALUES (?, ?, ?)",
            [(int(step), str(k), _opt_float(v)) for k, v in values.items()],
        )
        con.execute("COMMIT")

    def last_step(self) -> Optional[int]:
        """The largest step written, or None."""
        return self._con.execute("SELECT MAX(step) FROM steps").fetchone()[0]

    def truncate(self, from_step: int) -> int:
        """Delete every step ≥ ``from_step`` (used when resuming from a checkpoint).

        Returns:
            The number of steps deleted.
        """
        con = self._con
        con.execute("BEGIN")
        n = con.execute("SELECT COUNT(*) FROM steps WHERE step >= ?", (int(from_step),)).fetchone()[0]
        for table in ("steps", "layer_steps", "probes"):
            con.execute(f"DELETE FROM {table} WHERE step >= ?", (int(from_step),))
        con.execute("COMMIT")
        return int(n)

    def close(self) -> None:
        """Make the record one self-contained file, close it and release the writer's lock.

        The write-ahead log is checkpointed into the main file and the journal mode is
        switched back to ``DELETE``, so the closed record is the single file ``path``
        (no ``-wal``/``-shm``): it can be copied alone and read on a read-only mount.
        """
        if self._con is None:
            self._release()
            return
        try:
            self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._con.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.Error:  # pragma: no cover - a concurrent reader holds the log: it stays in WAL mode
            pass
        self._release()

    def _release(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None and getattr(self, "_owns_lock", True):
            lock.release()

    @property
    def closed(self) -> bool:
        return self._con is None

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
