"""The record's format: its columns (from :mod:`sdelip.core.catalogue`), the SQLite schema, the row type and errors.

See :mod:`sdelip.record` for what a record is and how it is written.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import attrs
import numpy as np

from ..core.catalogue import layer_columns, network_columns
from ..errors import NotARecordError, RecordExistsError  # noqa: F401  (defined there, re-exported)

__all__ = [
    "LAYER_QUANTITIES",
    "NETWORK_QUANTITIES",
    "StepRecord",
    "RecordExistsError",
    "NotARecordError",
    "remove_record",
]

#: Per-layer columns of :func:`load_record`, written ``<quantity>/<layer>``. ``K`` is the
#: layer's operator norm K^(ℓ) = σ1 (Prop 9); the others are the Thm 14 terms and the
#: relative spectral gap (σ1 − σ2)/σ1 (Assumption 11). Derived from :data:`sdelip.core.catalogue.TERMS`.
LAYER_QUANTITIES = layer_columns()


#: Network columns (Thm 15): Z = Σ log σ1, K = e^Z, μ_Z, κ_Z, λ_Z², and the Prop 6 split of κ_Z.
NETWORK_QUANTITIES = network_columns()


_LAYER_DB_COLUMNS = LAYER_QUANTITIES + ("degenerate",)


#: What the optimizer did with a step (:mod:`sdelip.tracking.update`): the scalar c relating the
#: gradient it stepped with to the tracked one (NaN: no scalar does; NULL: not observed), whether
#: the model coefficients describe the update, and why not.
UPDATE_COLUMNS = (("grad_scale", "REAL"), ("update_modelled", "INTEGER"), ("update_note", "TEXT"))

#: Columns added after the first schema; older records lack them (read as NULL, added on append).
#: ``diverged`` and ``checksum``: :mod:`sdelip.record.integrity`.
_ADDED_COLUMNS = {
    "steps": ("step_curvature_Z", "realised_drift_Z", "realised_curvature_Z", *(c for c, _ in UPDATE_COLUMNS),
              "diverged", "checksum"),
    "layer_steps": ("step_curvature", "realised_drift", "realised_curvature", "checksum"),
    "probes": ("checksum",),
}

#: The SQLite type of an added column (REAL unless named here).
_ADDED_COLUMN_TYPES = {"diverged": "INTEGER", "checksum": "INTEGER", **dict(UPDATE_COLUMNS)}


_STEP_DB_COLUMNS = (("step", "t", "lr", "loss", "batch_size") + NETWORK_QUANTITIES + ("degenerate",)
                    + tuple(c for c, _ in UPDATE_COLUMNS))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    idx INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, m INTEGER NOT NULL, n INTEGER NOT NULL,
    uses INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, t REAL NOT NULL, lr REAL NOT NULL, loss REAL, batch_size INTEGER,
    """ + ", ".join(f"{c} REAL" for c in NETWORK_QUANTITIES) + """,
    degenerate INTEGER NOT NULL DEFAULT 0,
    """ + ", ".join(f"{c} {kind}" for c, kind in UPDATE_COLUMNS) + """
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


def remove_record(path: Union[str, os.PathLike]) -> None:
    """Delete a record file together with its write-ahead log and shared-memory files.

    A symlink is followed: the file it names is deleted (and the link kept), as a writer
    through the link writes that file.
    """
    path = Path(path).resolve()
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
        update: what the optimizer did with the step (:data:`UPDATE_COLUMNS`: ``grad_scale``,
            ``update_modelled``, ``update_note``), or None when it was not observed.
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
    update: Optional[Mapping[str, Any]] = None

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
        u = self.update or {}
        row["grad_scale"] = np.nan if u.get("grad_scale") is None else float(u["grad_scale"])
        row["update_modelled"] = bool(u.get("update_modelled", True))
        row["update_note"] = u.get("update_note")
        for k, v in (self.probes or {}).items():
            row[k] = float(v)
        return row


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


# -- reading ------------------------------------------------------------------------------------
_SQLITE_HEADER = b"SQLite format 3\x00"


_RECORD_TABLES = {"meta", "layers", "steps", "layer_steps", "probes"}


def _table_columns(con: sqlite3.Connection, table: str) -> set:
    return {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
