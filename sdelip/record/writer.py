"""The record writer: one SQLite transaction per tracked step, one writer per file (see :mod:`sdelip.record`)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union


from ..errors import RecordWriteError, RecordNotClosedError  # noqa: F401  (defined there, re-exported)
from .format import (
    LAYER_QUANTITIES,
    NETWORK_QUANTITIES,
    NotARecordError,
    RecordExistsError,
    StepRecord,
    _ADDED_COLUMNS,
    _ADDED_COLUMN_TYPES,
    _LAYER_DB_COLUMNS,
    _SCHEMA,
    _STEP_DB_COLUMNS,
    _json_default,
    _opt_float,
    _table_columns,
    remove_record,
)
from .integrity import is_diverged, row_checksum
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
    "RecordWriteError",
    "RecordNotClosedError",
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


#: How long a write waits for SQLite's write lock held by another connection (``SDELIP_SQLITE_TIMEOUT_S``).
SQLITE_TIMEOUT_S = 30.0
#: How long :meth:`RecordWriter.close` retries folding the log while a reader holds it (``SDELIP_CLOSE_TIMEOUT_S``).
CLOSE_TIMEOUT_S = 20.0


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _connect(path: Union[str, os.PathLike]) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), isolation_level=None,
                          timeout=_env_seconds("SDELIP_SQLITE_TIMEOUT_S", SQLITE_TIMEOUT_S))
    return con


def _update_values(update: Optional[Mapping[str, Any]]) -> tuple:
    """The :data:`~sdelip.record.format.UPDATE_COLUMNS` of a step (NULL, 1, NULL when not observed)."""
    u = update or {}
    return (_opt_float(u.get("grad_scale")), int(bool(u.get("update_modelled", True))),
            None if u.get("update_note") is None else str(u["update_note"]))






def _free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _cause(exc: BaseException, path: Path) -> str:
    """The cause of a failed SQLite operation on a record, in words that name what to do."""
    text = str(exc)
    if "full" in text:
        free = _free_bytes(path.resolve().parent)
        return (f"the disk holding {str(path.resolve().parent)!r} is full "
                f"({free if free is not None else '?'} bytes free; SQLite: {text})")
    if "locked" in text or "busy" in text:
        return (f"another program holds SQLite's lock on the file (e.g. an sqlite3 shell or a script with an open "
                f"write transaction on it; waited {_env_seconds('SDELIP_SQLITE_TIMEOUT_S', SQLITE_TIMEOUT_S):g} s; "
                f"SQLite: {text})")
    return f"{type(exc).__name__}: {text}"


def _checked(cols: Sequence[str], values: Sequence) -> tuple:
    """``values`` followed by their checksum (:func:`sdelip.record.integrity.row_checksum`)."""
    return (*values, row_checksum(dict(zip(cols, values))))


def _rollback(con: sqlite3.Connection) -> None:
    try:
        con.execute("ROLLBACK")
    except sqlite3.Error:  # SQLite rolled back itself (e.g. a full disk), or no transaction was open
        pass


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
            file = self.path.resolve()  # through a symlink: the file it names (overwrite replaces that file)
            if mode == "overwrite":
                remove_record(file)
            self._con = _connect(file)
            con = self._con
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA synchronous={'FULL' if durability == 'power' else 'NORMAL'}")
            con.executescript(_SCHEMA)
            self._lock.hold_file()  # the lock follows the database file itself, also after overwrite
            for table, cols in _ADDED_COLUMNS.items():
                for col in sorted(set(cols) - _table_columns(con, table)):
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {col} {_ADDED_COLUMN_TYPES.get(col, 'REAL')}")
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
            # the record's identity: checkpoints name it, and are refused for another record
            self._put_meta({"record_id": uuid.uuid4().hex}, overwrite=False)
            con.execute("COMMIT")
            self.record_id = json.loads(con.execute("SELECT value FROM meta WHERE key = 'record_id'").fetchone()[0])
            self._ident = self._stat()
            self._first = con.execute("SELECT K, loss FROM steps ORDER BY step LIMIT 1").fetchone()
        except sqlite3.OperationalError as exc:
            self._release()
            raise RecordWriteError(f"opening the record {str(self.path)!r} for writing failed: "
                                   f"{_cause(exc, self.path)}") from None
        except BaseException:
            self._release()
            raise
        self._layer_idx = {name: i for i, name in enumerate(self.layer_names)}

    def _stat(self) -> Optional[tuple]:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _check_present(self) -> None:
        """Raise :class:`RecordWriteError` when the record file was deleted or replaced under the writer."""
        now = self._stat()
        if now != self._ident:
            what = "deleted" if now is None else "replaced by another file"
            raise RecordWriteError(
                f"the record {str(self.path)!r} was {what} while this run was writing it: the steps written to it are "
                "lost with the old file; nothing more is written. Rerun to write the record again (the run continues "
                "from its checkpoint if the record is restored, else start it again with --overwrite)"
            )

    def _failed(self, exc: BaseException, doing: str) -> RecordWriteError:
        """A :class:`RecordWriteError` naming the record, what was being done, and the cause."""
        try:
            self._check_present()
        except RecordWriteError as gone:
            return gone
        return RecordWriteError(f"{doing} the record {str(self.path)!r} failed: {_cause(exc, self.path)}; the steps "
                                "committed before are intact")

    # -- metadata ---------------------------------------------------------------------------
    def _put_meta(self, metadata: Mapping[str, Any], overwrite: bool = True) -> None:
        verb = "INSERT OR REPLACE" if overwrite else "INSERT OR IGNORE"
        self._con.executemany(
            f"{verb} INTO meta (key, value) VALUES (?, ?)",
            [(str(k), json.dumps(v, default=_json_default)) for k, v in metadata.items()],
        )

    def update_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Set (replace) metadata keys, committed immediately."""
        self._check_present()
        try:
            self._con.execute("BEGIN")
            self._put_meta(metadata, overwrite=True)
            self._con.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(self._con)
            raise self._failed(exc, "writing the metadata of") from None

    def metadata(self) -> dict:
        """The metadata currently stored."""
        return {k: json.loads(v) for k, v in self._con.execute("SELECT key, value FROM meta") if k != "record_id"}

    # -- steps ------------------------------------------------------------------------------
    def write(self, rec: StepRecord) -> None:
        """Write one step in a single committed transaction (durable once this returns)."""
        self._check_present()
        K, loss = _opt_float(rec.network.get("K")), _opt_float(rec.loss)
        if self._first is None:
            self._first = (K, loss)
        step_cols = _STEP_DB_COLUMNS + ("diverged",)
        step_row = _checked(step_cols, (
            int(rec.step), float(rec.t), float(rec.lr), loss, int(rec.batch_size),
            *(_opt_float(rec.network.get(k)) for k in NETWORK_QUANTITIES), int(bool(rec.degenerate)),
            *_update_values(rec.update),
            int(is_diverged(K, loss, *self._first)),
        ))
        layer_cols = ("step", "layer") + _LAYER_DB_COLUMNS
        layer_rows = []
        for name, q in rec.layers.items():
            layer_rows.append(_checked(layer_cols, (
                int(rec.step), self._layer_idx[name], *(_opt_float(q.get(k)) for k in LAYER_QUANTITIES),
                int(bool(q.get("degenerate", False))))))
        con = self._con
        try:
            con.execute("BEGIN")
            try:
                con.execute(f"INSERT INTO steps ({', '.join(step_cols)}, checksum) "
                            f"VALUES ({', '.join('?' * len(step_row))})", step_row)
                con.executemany(
                    f"INSERT INTO layer_steps ({', '.join(layer_cols)}, checksum) "
                    f"VALUES ({', '.join('?' * (len(layer_cols) + 1))})",
                    layer_rows,
                )
                if rec.probes:
                    self._insert_probes(rec.step, rec.probes)
            except BaseException:
                _rollback(con)
                raise
            con.execute("COMMIT")
        except sqlite3.IntegrityError:  # a step written twice: the caller's error, raised as such
            _rollback(con)
            raise
        except sqlite3.Error as exc:
            _rollback(con)
            raise self._failed(exc, f"writing step {int(rec.step)} to") from None

    def _insert_probes(self, step: int, values: Mapping[str, float]) -> None:
        self._con.executemany(
            "INSERT OR REPLACE INTO probes (step, name, value, checksum) VALUES (?, ?, ?, ?)",
            [_checked(("step", "name", "value"), (int(step), str(k), _opt_float(v))) for k, v in values.items()],
        )

    def write_probes(self, step: int, values: Mapping[str, float]) -> None:
        """Write probe values of a step (committed immediately)."""
        self._check_present()
        con = self._con
        try:
            con.execute("BEGIN")
            self._insert_probes(step, values)
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(con)
            raise self._failed(exc, f"writing the probes of step {int(step)} to") from None

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
        self._first = con.execute("SELECT K, loss FROM steps ORDER BY step LIMIT 1").fetchone()
        return int(n)

    def close(self) -> None:
        """Make the record one self-contained file, close it and release the writer's lock.

        The write-ahead log is checkpointed into the main file and the journal mode is
        switched back to ``DELETE``, so the closed record is the single file ``path``
        (no ``-wal``/``-shm``): it can be copied alone and read on a read-only mount.

        A reader holding a read transaction keeps the log from being folded: the
        checkpoint is retried for up to ``SDELIP_CLOSE_TIMEOUT_S`` seconds (default
        :data:`CLOSE_TIMEOUT_S`), and a wait of more than a second is reported (a
        warning). When every row is in the file but another connection keeps it open,
        the file stays in WAL mode with an empty log: it is still complete on its own.

        Raises:
            RecordNotClosedError: rows are still only in ``<path>-wal`` (a reader held the
                log past the timeout, or the disk is full); the message names the record,
                the cause and how to finish it (``sdelip copy``). The connection is closed
                and the lock released all the same; every committed step is in the record
                as long as its ``-wal`` file stays beside it.
            RecordWriteError: the record file was deleted or replaced during the run.
        """
        if self._con is None:
            self._release()
            return
        try:
            self._check_present()
            problem = self._fold_log()
        except BaseException:
            self._release()
            raise
        self._release()
        if problem:
            raise RecordNotClosedError(
                f"the record {str(self.path)!r} is not one self-contained file: {problem}. Every committed step is "
                f"in it together with {str(self.path) + '-wal'!r}: keep the two together, and once the reader has "
                f"let go run `sdelip copy {self.path} <new file>` to make one self-contained file (or open it with "
                "sdelip again, which folds the log)"
            )

    def _fold_log(self) -> Optional[str]:
        """Checkpoint the log into the file (retrying while a reader holds it); what is wrong, or None."""
        con = self._con
        timeout = _env_seconds("SDELIP_CLOSE_TIMEOUT_S", CLOSE_TIMEOUT_S)
        start = time.monotonic()
        con.execute("PRAGMA busy_timeout=200")
        in_file = False
        error = None
        while True:
            try:
                busy, log, done = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                in_file = busy == 0 or (log >= 0 and log == done)
                if busy == 0:
                    mode = con.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
                    if str(mode).lower() == "delete":
                        break
            except sqlite3.Error as exc:
                error = exc
                if "full" in str(exc):
                    break
            # all rows in the file but the mode cannot change (another connection is open): wait a little only
            if time.monotonic() - start >= (min(timeout, 2.0) if in_file else timeout):
                break
            time.sleep(0.1)
        waited = time.monotonic() - start
        if waited >= 1.0:
            warnings.warn(f"closing the record {str(self.path)!r} waited {waited:.1f} s for another connection (a "
                          "reader holding a read transaction on it) to let go of its write-ahead log",
                          stacklevel=4)
        if in_file:
            return None
        if error is not None and "full" in str(error):
            return f"folding its write-ahead log into it failed: {_cause(error, self.path)}"
        return (f"another connection (a reader holding a read transaction, e.g. an sqlite3 shell or a notebook) kept "
                f"its write-ahead log for {waited:.0f} s" + (f" (SQLite: {error})" if error is not None else ""))

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
