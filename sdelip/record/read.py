"""Reading records: read-only, also on read-only mounts and while a run writes.

Damaged or foreign files are refused by name.

See :mod:`sdelip.record` for the format and the guarantees.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from .integrity import DamagedRecordError, damaged_steps, describe_damage, truncation
from .format import (
    NETWORK_QUANTITIES,
    NotARecordError,
    _LAYER_DB_COLUMNS,
    _RECORD_TABLES,
    _SQLITE_HEADER,
    _STEP_DB_COLUMNS,
    _table_columns,
)

#: The meta key of the record's identity (:func:`load_record_id`).
RECORD_ID_KEY = "record_id"

__all__ = [
    "check_record_file",
    "record_steps",
    "copy_record",
    "load_record",
    "load_metadata",
    "load_record_id",
    "load_probes",
    "load_layers",
    "load_layer_uses",
    "records_equal",
]


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
    folder = dst.parent if str(dst.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot copy the record to {str(dst)!r}: its folder {str(folder)!r} does not exist "
                                "(create it first)")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot copy the record to {str(dst)!r}: its folder {str(folder)!r} is not writable")
    tmp = dst.with_name(dst.name + ".tmp")
    with _Reading(src) as con:
        try:
            out = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                con.backup(out)
                out.execute("PRAGMA journal_mode=DELETE")
            finally:
                out.close()
        except sqlite3.Error as exc:
            for p in (tmp, Path(str(tmp) + "-journal")):
                p.unlink(missing_ok=True)
            raise OSError(f"writing the copy {str(dst)!r} failed: {exc} (the source {str(src)!r} is unchanged)") \
                from None
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
    """The run metadata of a record (model summary, layer shapes, η, M, engine, seed, versions…).

    The record's identity (:func:`load_record_id`) is kept apart.
    """
    with _Reading(path) as con:
        return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta") if k != RECORD_ID_KEY}


def load_record_id(path):
    """The record's identity: a random id given when the record was created (None for older records).

    Checkpoints name the record they belong to by it, and are refused for another.
    """
    with _Reading(path) as con:
        row = con.execute("SELECT value FROM meta WHERE key = ?", (RECORD_ID_KEY,)).fetchone()
    return None if row is None else json.loads(row[0])


def load_probes(path) -> pd.DataFrame:
    """Every probe value of a record as a wide DataFrame indexed by step (columns: probe names)."""
    with _Reading(path) as con:
        long = pd.read_sql_query("SELECT step, name, value FROM probes ORDER BY step", con)
    if long.empty:
        return pd.DataFrame({"step": pd.Series([], dtype="int64")})
    wide = long.pivot(index="step", columns="name", values="value").reset_index()
    wide.columns.name = None
    return wide


def _meta_value(con: sqlite3.Connection, key: str):
    row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    try:
        return json.loads(row[0])
    except ValueError:
        return None


def _update_modelled(steps: pd.DataFrame, optimizer) -> pd.Series:
    """``update_modelled`` per row; for records written before it existed, from the optimizer's metadata.

    Until sdelip 0.1 every optimizer was given the plain-SGD formulas: such a record's
    coefficients describe its updates only when the optimizer was SGD without momentum
    (or absent, η given).
    """
    col = steps["update_modelled"]
    if col.notna().all():
        return col.astype(bool)
    legacy = True
    if isinstance(optimizer, dict) and "rule" not in optimizer:
        groups = optimizer.get("param_groups") or [{}]
        legacy = optimizer.get("class") == "SGD" and all(not g.get("momentum") and not g.get("maximize")
                                                          for g in groups)
    return col.fillna(legacy).astype(bool)


def load_record(path, intact_only: bool = False) -> pd.DataFrame:
    """Read a record as a pandas DataFrame, one row per tracked step, ordered by step.

    Columns:

    - ``step``, ``t`` (= Σ_{j<k} η_j, kη for constant η), ``lr``, ``loss``, ``batch_size``;
    - per layer ℓ (forward order), ``K/<ℓ>`` (= σ1, Prop 9), ``drift/<ℓ>`` (μ),
      ``noise_curvature/<ℓ>`` (κ), ``noise_curvature_var/<ℓ>``, ``noise_curvature_cov/<ℓ>``
      (Prop 6 split; NaN when the split was off), ``diffusion_sq/<ℓ>`` (‖λ‖²),
      ``gap/<ℓ>`` ((σ1 − σ2)/σ1), ``step_curvature/<ℓ>`` (the O(η) drift of a discrete
      step that the SDE drops, :class:`sdelip.core.formulas.LayerTerms`) and ``degenerate/<ℓ>``
      (bool, Assumption 11 violated);
    - only in records of models with tied weights, ``uses/<ℓ>`` (int): c, the number of
      times layer ℓ's weight is applied per forward pass. Such a layer's columns are the
      terms of its one θ; the network columns count it as the factor σ1^c of K
      (:func:`sdelip.core.formulas.repeated_use_terms`);
    - per layer, ``realised_drift/<ℓ>`` = u1ᵀΔv1/(ησ1) and ``realised_curvature/<ℓ>`` =
      ½vec(Δ)ᵀH vec(Δ)/(ησ1) of the update Δ the optimizer actually applied (NaN where the
      step was not observed: no optimizer, or the run stopped before ``optimizer.step()``);
    - network: ``Z``, ``K``, ``drift_Z``, ``noise_curvature_Z``, ``diffusion_sq_Z``,
      ``noise_curvature_var_Z``, ``noise_curvature_cov_Z`` (Thm 15), ``step_curvature_Z``,
      ``realised_drift_Z``, ``realised_curvature_Z`` and ``degenerate``;
    - what the optimizer did with the step: ``grad_scale`` (c, the gradient it stepped with
      is c times the tracked one; NaN when no scalar relates them or not observed),
      ``update_modelled`` (bool: the model coefficients describe the update; for records of
      sdelip 0.1, True only for SGD without momentum) and ``update_note`` (why not, or what
      was edited);
    - probes measured on tracked steps, when any: ``conv_opnorm/<ℓ>``, ``lipschitz_lower``
      (NaN on steps without a probe; :func:`load_probes` has every probe row).


    The steps the writer flagged diverged (K or loss non-finite or grown by
    :data:`~sdelip.record.integrity.DIVERGENCE_FACTOR` over the first row's) are in
    ``df.attrs["diverged_steps"]`` (:func:`~sdelip.record.integrity.diverged_steps`
    applies the same rule to records written before the flag).

    Only tracked steps are rows. Reading while a run is writing is safe; after a crash
    the rows are exactly the committed steps.

    Every row's checksum is verified and the file's length checked against its header
    (:mod:`sdelip.record.integrity`).

    Args:
        path: the record.
        intact_only: read what is intact of a damaged record: the steps whose rows fail
            their checksum are left out (a warning names them) instead of refusing the file.

    Raises:
        DamagedRecordError: rows fail their checksum or the file was cut short (the
            message names the record and the steps); ``intact_only=True`` reads the rest.
    """
    cut = truncation(path) if Path(path).exists() else None
    try:
        with _Reading(path) as con:
            bad = damaged_steps(con)
            frames = _read_frames(con)
    except NotARecordError as exc:
        if cut:
            raise DamagedRecordError(f"the record {str(path)!r} is damaged: {cut} ({exc})") from None
        raise
    problem = describe_damage(path, bad, cut)
    if problem:
        if not intact_only:
            raise DamagedRecordError(problem + "; its numbers cannot be trusted. load_record(..., intact_only=True) "
                                     "(--intact-only on the command line) reads the rows that are intact")
        import warnings

        drop = sorted({s for steps in bad.values() for s in steps})
        warnings.warn(problem + f"; reading the intact rows only ({len(drop)} step(s) left out)", stacklevel=2)
        uses, steps, lay, probes = frames
        frames = (uses, steps[~steps["step"].isin(drop)].reset_index(drop=True), lay[~lay["step"].isin(drop)],
                  probes[~probes["step"].isin(drop)])
    return _assemble(*frames)


def _read_frames(con: sqlite3.Connection):
    """The record's tables as read (uses, steps, layer rows, probes), before they are assembled."""
    uses = _layer_uses(con)
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
    steps["update_modelled"] = _update_modelled(steps, _meta_value(con, "optimizer"))
    steps["diverged"] = (pd.read_sql_query("SELECT diverged FROM steps ORDER BY step", con)["diverged"]
                         if "diverged" in have_steps else None)
    return uses, steps, lay, probes


def _assemble(uses, steps, lay, probes) -> pd.DataFrame:
    layers = list(uses)
    for c in NETWORK_QUANTITIES + ("t", "lr", "loss"):
        steps[c] = steps[c].astype("float64")
    steps["degenerate"] = steps["degenerate"].astype(bool)
    steps["grad_scale"] = steps["grad_scale"].astype("float64")
    steps["update_note"] = steps["update_note"].astype(object).where(steps["update_note"].notna(), None)
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
    blocks.append(steps[list(NETWORK_QUANTITIES) + ["degenerate", "grad_scale", "update_modelled", "update_note"]])
    out = pd.concat([b.reset_index(drop=True) for b in blocks], axis=1)
    if not probes.empty:
        pw = probes.pivot(index="step", columns="name", values="value")
        pw = pw.reindex(steps["step"])
        for name in pw.columns:
            out[name] = pw[name].to_numpy(dtype="float64")
    out["step"] = out["step"].astype("int64")
    flags = steps["diverged"]
    if flags.notna().any():
        out.attrs["diverged_steps"] = [int(k) for k, f in zip(steps["step"], flags) if f == 1]
    return out


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

def verify_record(path) -> Optional[str]:
    """What is damaged in a record file (truncation, rows failing their checksum), or None when sound."""
    cut = truncation(path)
    try:
        with _Reading(path) as con:
            bad = damaged_steps(con)
    except NotARecordError as exc:
        return str(exc)
    return describe_damage(path, bad, cut)
