"""Durable records of the Lipschitz dynamics along a training run.

A record is one SQLite database (standard library, no server). Row k holds the Thm 14
layer terms and the Thm 15 network terms measured at the parameters before SGD update
k, on step k's mini-batch, with the SDE time t_k = Σ_{j<k} η_j (= kη for a constant
learning rate, THEORY.md §1).

Durability: every step is written in one transaction and committed before the next step
starts. The database runs in write-ahead-log mode, so a process killed at any moment
(``kill -9`` included) leaves a consistent record of every committed step; SQLite
replays the log when the file is next opened. With ``durability="process"`` (the
default, ``synchronous=NORMAL``) a committed step survives the death of the process;
``durability="power"`` (``synchronous=FULL``) also survives an operating-system crash or
power loss, at the price of one fsync per step (about 3.5 ms on the development machine,
more than a plain MLP step).

A record has one writer (:mod:`sdelip.record_lock`: a second one is refused, naming the
holder). Closing the writer folds the log into the file and switches the journal mode to
``DELETE``, so a closed record is the single file. Readers open it read-only
(``mode=ro``), also on read-only mounts; :func:`copy_record` copies a record that is still
being written. Files that are not records (directories, random bytes, damaged or foreign
SQLite databases) are refused by name (:class:`NotARecordError`), and never written.

Tables::

    meta(key, value)                 run metadata, JSON values
    layers(idx, name, kind, m, n, uses)  the tracked layers in forward order (uses: c, the
                                     number of times a tied weight is applied; 1 otherwise)
    steps(step, t, lr, loss, batch_size, Z, K, drift_Z, …, degenerate)
    layer_steps(step, layer, K, drift, noise_curvature, …, gap, degenerate)
    probes(step, name, value)        optional probes (conv operator norms, Lipschitz lower bound)

:func:`load_record` returns the wide pandas DataFrame documented there;
:func:`load_metadata` the metadata dict; :func:`load_probes` every probe row.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import attrs
import numpy as np
import pandas as pd

from .record_lock import RecordLock, RecordLockedError
from .terms import layer_columns, network_columns

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

#: Per-layer columns of :func:`load_record`, written ``<quantity>/<layer>``. ``K`` is the
#: layer's operator norm K^(ℓ) = σ1 (Prop 9); the others are the Thm 14 terms and the
#: relative spectral gap (σ1 − σ2)/σ1 (Assumption 11). Derived from :data:`sdelip.terms.TERMS`.
LAYER_QUANTITIES = layer_columns()
#: Network columns (Thm 15): Z = Σ log σ1, K = e^Z, μ_Z, κ_Z, λ_Z², and the Prop 6 split of κ_Z.
NETWORK_QUANTITIES = network_columns()

_LAYER_DB_COLUMNS = LAYER_QUANTITIES + ("degenerate",)
#: Columns added after the first schema; older records lack them (read as NULL, added on append).
_ADDED_COLUMNS = {"steps": ("step_curvature_Z",), "layer_steps": ("step_curvature",)}
_STEP_DB_COLUMNS = ("step", "t", "lr", "loss", "batch_size") + NETWORK_QUANTITIES + ("degenerate",)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    idx INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, m INTEGER NOT NULL, n INTEGER NOT NULL,
    uses INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, t REAL NOT NULL, lr REAL NOT NULL, loss REAL, batch_size INTEGER,
    """ + ", ".join(f"{c} REAL" for c in NETWORK_QUANTITIES) + """,
    degenerate INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS layer_steps (
    step INTEGER NOT NULL, layer INTEGER NOT NULL,
    """ + ", ".join(f"{c} REAL" for c in LAYER_QUANTITIES) + """, degenerate INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (step, layer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS probes (
    step INTEGER NOT NULL, name TEXT NOT NULL, value REAL, PRIMARY KEY (step, name)
) WITHOUT ROWID;
"""


class RecordExistsError(FileExistsError):
    """The record file already holds steps and neither append nor overwrite was asked for."""


class NotARecordError(ValueError):
    """A path is not an sdelip record: a directory, not an SQLite file, another program's database, or damaged."""


def remove_record(path: Union[str, os.PathLike]) -> None:
    """Delete a record file together with its write-ahead log and shared-memory files."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(str(path) + suffix)
        if p.exists():
            p.unlink()


def _opt_float(v) -> Optional[float]:
    return None if v is None else float(v)


@attrs.frozen
class StepRecord:
    """The quantities of one tracked step (row ``step`` of the record).

    Attributes:
        step: the SGD step k (0-based); the terms are at the parameters before update k.
        t: the SDE time t_k = Σ_{j<k} η_j.
        lr: η_k, the learning rate of update k.
        loss: the mean of the per-sample losses of step k's mini-batch.
        batch_size: M.
        layers: layer name → dict with the :data:`LAYER_QUANTITIES` and ``degenerate``.
        network: dict with the :data:`NETWORK_QUANTITIES`.
        degenerate: True when any layer's top singular value was degenerate (Assumption 11).
        probes: optional name → value (``conv_opnorm/<layer>``, ``lipschitz_lower``).
    """

    step: int
    t: float
    lr: float
    loss: float
    batch_size: int
    layers: Mapping[str, Mapping[str, Any]]
    network: Mapping[str, Optional[float]]
    degenerate: bool = False
    probes: Optional[Mapping[str, float]] = None

    def get(self, key: str, default=None):
        """A value by :func:`load_record` column name, e.g. ``rec.get("K")`` or ``rec.get("drift/fc1")``."""
        return self.as_row().get(key, default)

    def __getitem__(self, key: str):
        row = self.as_row()
        if key not in row:
            raise KeyError(key)
        return row[key]

    def as_row(self) -> dict:
        """The step as one row with :func:`load_record`'s column names."""
        row = {"step": self.step, "t": self.t, "lr": self.lr, "loss": self.loss, "batch_size": self.batch_size}
        for name, q in self.layers.items():
            for key in _LAYER_DB_COLUMNS:
                v = q.get(key)
                row[f"{key}/{name}"] = bool(v) if key == "degenerate" else (np.nan if v is None else float(v))
        for key in NETWORK_QUANTITIES:
            v = self.network.get(key)
            row[key] = np.nan if v is None else float(v)
        row["degenerate"] = bool(self.degenerate)
        for k, v in (self.probes or {}).items():
            row[k] = float(v)
        return row


def _connect(path: Union[str, os.PathLike]) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
    return con


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


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

        lock: a :class:`~sdelip.record_lock.RecordLock` on ``path`` already held by the
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
                for col in set(cols) - _table_columns(con, table):
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {col} REAL")
            if "uses" not in _table_columns(con, "layers"):  # records written before tied weights were counted
                con.execute("ALTER TABLE layers ADD COLUMN uses INTEGER NOT NULL DEFAULT 1")
            layers = [tuple(layer) if len(layer) == 4 else (*layer, 1) for layer in layers]
            self.layer_names = [name for name, _, _, _ in layers]
            existing = con.execute("SELECT name, kind, m, n, uses FROM layers ORDER BY idx").fetchall()
            n_steps = con.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
            if mode == "new" and n_steps > 0:
                raise RecordExistsError(
                    f"record {str(self.path)!r} already holds {n_steps} step(s); pass overwrite=True to start a new "
                    "record there, or resume the run from a checkpoint (Tracker.resume) to continue it"
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


# -- reading ------------------------------------------------------------------------------------
_SQLITE_HEADER = b"SQLite format 3\x00"
_RECORD_TABLES = {"meta", "layers", "steps", "layer_steps", "probes"}


def _ro_connect(path: Path) -> sqlite3.Connection:
    """A read-only connection (``file:…?mode=ro``): works on read-only files, folders and mounts.

    A database left in WAL mode without its ``-shm`` file (a record of an older sdelip, or
    one whose writer exited without ``close()``) cannot be opened with ``mode=ro`` where
    the ``-shm`` cannot be created (a read-only folder or mount). With no ``-wal`` file
    beside it all its rows are in the file itself, and nobody can be writing it there, so
    it is then opened as ``immutable``.
    """
    from urllib.parse import quote

    path = Path(path).resolve()
    uri = f"file:{quote(str(path))}"
    con = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, timeout=30.0)
    try:
        con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return con
    except sqlite3.OperationalError:
        con.close()
        if Path(str(path) + "-wal").exists() or os.access(path.parent, os.W_OK):
            raise
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None, timeout=30.0)


def check_record_file(path: Union[str, os.PathLike], for_writing: bool = False) -> None:
    """Check that ``path`` is an sdelip record (or, for writing, may become one).

    For writing, a missing or empty file is fine. Otherwise the file must be an SQLite
    database holding only the record's tables.

    Raises:
        FileNotFoundError: reading, and there is no file.
        NotARecordError: a directory, a file that is not an SQLite database (random
            bytes, a truncated header), a damaged database, or another program's
            database; the message names the path and what is wrong.
    """
    p = Path(path)
    if p.is_dir():
        raise NotARecordError(f"{str(p)!r} is a directory, not an sdelip record (a record is one SQLite file)")
    if not p.exists():
        if for_writing:
            return
        raise FileNotFoundError(f"no record at {str(p)!r}")
    size = p.stat().st_size
    if size == 0:
        if for_writing:
            return
        raise NotARecordError(f"{str(p)!r} is an empty file, not an sdelip record")
    with open(p, "rb") as f:
        head = f.read(len(_SQLITE_HEADER))
    if head != _SQLITE_HEADER:
        raise NotARecordError(
            f"{str(p)!r} is not an sdelip record: it is not an SQLite database ({size} bytes starting {head[:8]!r})"
            + ("; refusing to write into it, delete it or choose another path" if for_writing else "")
        )
    try:
        con = _ro_connect(p)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise NotARecordError(f"{str(p)!r} is not a readable sdelip record: {exc} (a truncated or damaged file?)") \
            from None
    foreign = tables - _RECORD_TABLES
    if foreign or (tables and not {"meta", "layers", "steps"} <= tables):
        raise NotARecordError(
            f"{str(p)!r} is an SQLite database of another program, not an sdelip record (tables "
            f"{sorted(tables)})" + ("; refusing to write into it or replace it, choose another path"
                                    if for_writing else "")
        )
    if not tables and not for_writing:
        raise NotARecordError(f"{str(p)!r} is an empty SQLite database, not an sdelip record")


def _open_for_reading(path) -> sqlite3.Connection:
    """A read-only connection to a checked record.

    Readers never write: they open the file with ``mode=ro``, so a record can be read on
    a read-only mount or by a user who may not write its folder. A record still being
    written (or left by a killed writer) is in WAL mode; its committed rows in the
    ``-wal`` file are read as long as the ``-wal``/``-shm`` files are readable.
    """
    p = Path(path)
    check_record_file(p)
    return _ro_connect(p)


class _Reading:
    """``with _Reading(path) as con``: a read-only connection; SQLite errors name the path."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self) -> sqlite3.Connection:
        self.con = _open_for_reading(self.path)
        return self.con

    def __exit__(self, typ, exc, tb):
        self.con.close()
        if isinstance(exc, pd.errors.DatabaseError) and isinstance(exc.__cause__ or exc.__context__,
                                                                    sqlite3.DatabaseError):
            exc = exc.__cause__ or exc.__context__
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            raise NotARecordError(f"{str(self.path)!r} is not a readable sdelip record: {exc} (a truncated or "
                                  "damaged file?)") from None
        if isinstance(exc, sqlite3.OperationalError):
            raise NotARecordError(f"reading the record {str(self.path)!r} failed: {exc}") from None
        return False


def copy_record(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> Path:
    """Copy a record, also one that is still being written, into one self-contained file.

    Uses SQLite's online backup API: the copy is a consistent snapshot of the committed
    steps (those still in the source's ``-wal`` file included), written to ``dst`` in
    ``DELETE`` journal mode, i.e. the single file ``dst``. The source is opened
    read-only and its writer is not disturbed. ``dst`` must not exist.

    Raises:
        FileExistsError: ``dst`` exists.
        NotARecordError: ``src`` is not a record.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{str(dst)!r} exists; copy_record does not overwrite")
    tmp = dst.with_name(dst.name + ".tmp")
    with _Reading(src) as con:
        out = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            con.backup(out)
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()
    os.replace(tmp, dst)
    return dst


def record_steps(path) -> dict:
    """Cheap facts about a record's rows: ``rows``, ``last_step`` (None when empty) and ``lrs`` (sorted)."""
    with _Reading(path) as con:
        rows, last = con.execute("SELECT COUNT(*), MAX(step) FROM steps").fetchone()
        lrs = sorted(r[0] for r in con.execute("SELECT DISTINCT lr FROM steps"))
    return {"rows": int(rows), "last_step": None if last is None else int(last), "lrs": lrs}


def load_layers(path) -> list[tuple[str, str, tuple[int, int]]]:
    """The tracked layers of a record: (name, kind, (m, n)) in forward order."""
    with _Reading(path) as con:
        return [(n, k, (m, nn)) for n, k, m, nn in con.execute("SELECT name, kind, m, n FROM layers ORDER BY idx")]


def _layer_uses(con: sqlite3.Connection) -> dict[str, int]:
    if "uses" not in _table_columns(con, "layers"):
        return {name: 1 for (name,) in con.execute("SELECT name FROM layers ORDER BY idx")}
    return {name: int(u) for name, u in con.execute("SELECT name, uses FROM layers ORDER BY idx")}


def load_layer_uses(path) -> dict[str, int]:
    """How many times each tracked layer's weight is applied per forward pass (1 unless tied)."""
    with _Reading(path) as con:
        return _layer_uses(con)


def load_metadata(path) -> dict:
    """The run metadata of a record (model summary, layer shapes, η, M, engine, seed, versions…)."""
    with _Reading(path) as con:
        return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}


def load_probes(path) -> pd.DataFrame:
    """Every probe value of a record as a wide DataFrame indexed by step (columns: probe names)."""
    with _Reading(path) as con:
        long = pd.read_sql_query("SELECT step, name, value FROM probes ORDER BY step", con)
    if long.empty:
        return pd.DataFrame({"step": pd.Series([], dtype="int64")})
    wide = long.pivot(index="step", columns="name", values="value").reset_index()
    wide.columns.name = None
    return wide


def load_record(path) -> pd.DataFrame:
    """Read a record as a pandas DataFrame, one row per tracked step, ordered by step.

    Columns:

    - ``step``, ``t`` (= Σ_{j<k} η_j, kη for constant η), ``lr``, ``loss``, ``batch_size``;
    - per layer ℓ (forward order), ``K/<ℓ>`` (= σ1, Prop 9), ``drift/<ℓ>`` (μ),
      ``noise_curvature/<ℓ>`` (κ), ``noise_curvature_var/<ℓ>``, ``noise_curvature_cov/<ℓ>``
      (Prop 6 split; NaN when the split was off), ``diffusion_sq/<ℓ>`` (‖λ‖²),
      ``gap/<ℓ>`` ((σ1 − σ2)/σ1), ``step_curvature/<ℓ>`` (the O(η) drift of a discrete
      step that the SDE drops, :class:`sdelip.dynamics.LayerTerms`) and ``degenerate/<ℓ>``
      (bool, Assumption 11 violated);
    - only in records of models with tied weights, ``uses/<ℓ>`` (int): c, the number of
      times layer ℓ's weight is applied per forward pass. Such a layer's columns are the
      terms of its one θ; the network columns count it as the factor σ1^c of K
      (:func:`sdelip.dynamics.repeated_use_terms`);
    - network: ``Z``, ``K``, ``drift_Z``, ``noise_curvature_Z``, ``diffusion_sq_Z``,
      ``noise_curvature_var_Z``, ``noise_curvature_cov_Z`` (Thm 15), ``step_curvature_Z``
      and ``degenerate``;
    - probes measured on tracked steps, when any: ``conv_opnorm/<ℓ>``, ``lipschitz_lower``
      (NaN on steps without a probe; :func:`load_probes` has every probe row).

    Only tracked steps are rows. Reading while a run is writing is safe; after a crash
    the rows are exactly the committed steps.
    """
    with _Reading(path) as con:
        uses = _layer_uses(con)
        layers = list(uses)
        have_steps, have_layers = _table_columns(con, "steps"), _table_columns(con, "layer_steps")
        step_cols = [c if c in have_steps else f"NULL AS {c}" for c in _STEP_DB_COLUMNS]
        layer_cols = [f"ls.{c}" if c in have_layers else f"NULL AS {c}" for c in _LAYER_DB_COLUMNS]
        steps = pd.read_sql_query(f"SELECT {', '.join(step_cols)} FROM steps ORDER BY step", con)
        lay = pd.read_sql_query(
            f"SELECT ls.step AS step, l.name AS layer, {', '.join(layer_cols)} "
            "FROM layer_steps ls JOIN layers l ON ls.layer = l.idx ORDER BY ls.step, l.idx",
            con,
        )
        probes = pd.read_sql_query("SELECT step, name, value FROM probes ORDER BY step", con)
    for c in NETWORK_QUANTITIES + ("t", "lr", "loss"):
        steps[c] = steps[c].astype("float64")
    steps["degenerate"] = steps["degenerate"].astype(bool)
    front = steps[["step", "t", "lr", "loss", "batch_size"]]
    blocks = [front]
    if not lay.empty:
        wide = lay.pivot(index="step", columns="layer")
        for q in _LAYER_DB_COLUMNS:
            for name in layers:
                col = wide[(q, name)] if (q, name) in wide.columns else pd.Series(np.nan, index=wide.index)
                col = col.reindex(steps["step"]).to_numpy()
                blocks.append(pd.DataFrame({f"{q}/{name}": col.astype(bool) if q == "degenerate" else col.astype("float64")}))
    else:
        for q in _LAYER_DB_COLUMNS:
            for name in layers:
                dtype = bool if q == "degenerate" else "float64"
                blocks.append(pd.DataFrame({f"{q}/{name}": pd.Series([], dtype=dtype)}))
    if any(c != 1 for c in uses.values()):
        for name in layers:
            blocks.append(pd.DataFrame({f"uses/{name}": np.full(len(steps), uses[name], dtype=np.int64)}))
    blocks.append(steps[list(NETWORK_QUANTITIES) + ["degenerate"]])
    out = pd.concat([b.reset_index(drop=True) for b in blocks], axis=1)
    if not probes.empty:
        pw = probes.pivot(index="step", columns="name", values="value")
        pw = pw.reindex(steps["step"])
        for name in pw.columns:
            out[name] = pw[name].to_numpy(dtype="float64")
    out["step"] = out["step"].astype("int64")
    return out


def _table_columns(con: sqlite3.Connection, table: str) -> set:
    return {row[1] for row in con.execute(f"PRAGMA table_info({table})")}


def records_equal(a, b, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """True when two records (paths or DataFrames) hold the same steps and numbers.

    With the default tolerances the comparison is bitwise (NaN equals NaN).
    """
    da = load_record(a) if not isinstance(a, pd.DataFrame) else a
    db = load_record(b) if not isinstance(b, pd.DataFrame) else b
    if list(da.columns) != list(db.columns) or len(da) != len(db):
        return False
    for c in da.columns:
        x, y = da[c].to_numpy(), db[c].to_numpy()
        if x.dtype.kind in "fc" or y.dtype.kind in "fc":
            if not np.allclose(x.astype(float), y.astype(float), rtol=rtol, atol=atol, equal_nan=True):
                return False
        elif not np.array_equal(x, y):
            return False
    return True
