"""Record folders of a sweep: staging, the result file written last, damage detection, shared-root tokens."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
import uuid
from typing import Iterable, Mapping, Optional, Sequence

from .tasks import Task, TaskResult, _display


#: The file that marks a record folder as complete (written last).
RESULT_FILE = "result.json"


#: The file, in each root, listing the tasks of the last sweep that failed.
FAILURES_FILE = "failures.json"


_STAGING = ".staging"


_TOKEN_FILE = ".sweep-token"


def _roots(keyed: Sequence[tuple], root) -> dict:
    """key → the folder that holds the task's record folder."""
    if isinstance(root, Mapping):
        missing = [_display(k) for k, _ in keyed if k not in root]
        if missing:
            raise ValueError(f"the root mapping has no folder for tasks {missing}")
        roots = {k: pathlib.Path(root[k]) for k, _ in keyed}
    else:
        roots = {k: pathlib.Path(root) for k, _ in keyed}
    seen: dict = {}
    for k, t in keyed:
        other = seen.setdefault((roots[k], t.id), k)
        if other != k:
            raise ValueError(f"tasks {_display(other)!r} and {_display(k)!r} have the same record folder "
                             f"{roots[k] / t.id} (same fn, name and config under one root)")
    return roots


def load_result(task: Task, folder: pathlib.Path) -> Optional[TaskResult]:
    """The :class:`TaskResult` of a complete record folder, or None when it is not complete.

    Raises:
        ValueError: ``result.json`` is empty, truncated or lacks the value (named in the message).
    """
    path = pathlib.Path(folder) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        return TaskResult(task=task, value=meta["value"], dir=pathlib.Path(folder), seconds=float(meta["seconds"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None


_LOCK_FILE = ".sweep.lock"


def lock_roots(roots: Iterable[pathlib.Path]) -> list:
    """One sweep per output folder: a lock on each root (``<root>/.sweep.lock``), held by the caller.

    Raises:
        sdelip.record.RecordLockedError: another sweep holds a root (named with its process).
    """
    from ...record.lock import RecordLock

    locks = []
    try:
        for r in sorted(set(roots)):
            locks.append(RecordLock(r, what="sweep folder", lock_file=pathlib.Path(r) / _LOCK_FILE))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


def manifest(folder: pathlib.Path) -> dict:
    """relative path → {"size", "sha256"} of every file a task wrote into ``folder`` (``result.json`` aside)."""
    import hashlib

    out = {}
    for p in sorted(pathlib.Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_file() and rel != RESULT_FILE:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = {"size": p.stat().st_size, "sha256": h.hexdigest()}
    return out


def _manifest_damage(folder: pathlib.Path, files: Mapping) -> Optional[str]:
    """Which file of the manifest is missing or changed (None when all are present and intact)."""
    now = manifest(folder)
    for rel, want in files.items():
        if rel not in now:
            return f"{folder / rel} is missing (the task wrote it; result.json lists it)"
        if now[rel] != want:
            return (f"{folder / rel} is damaged: it has changed since the task wrote it ({now[rel]['size']} bytes, "
                    f"{want['size']} written; its SHA-256 differs)")
    return None


def damage(folder: pathlib.Path) -> Optional[str]:
    """What is wrong with a record folder that has a ``result.json``, or None when it is sound.

    Checks that ``result.json`` parses with a value, that every file it lists (the
    manifest the sweep wrote: sizes and SHA-256) is present and unchanged, that every
    sdelip record in the folder passes its row checksums (:mod:`sdelip.record.integrity`),
    and that every other SQLite file (``*.db``) passes SQLite's ``quick_check`` (a
    truncated or corrupted record fails it).
    """
    import sqlite3
    from urllib.parse import quote

    folder = pathlib.Path(folder)
    try:
        meta = json.loads((folder / RESULT_FILE).read_text())
        if not isinstance(meta, dict) or "value" not in meta or "seconds" not in meta:
            return f"{folder / RESULT_FILE} lacks the task's value"
    except (OSError, ValueError) as exc:
        return f"{folder / RESULT_FILE} is empty or truncated ({type(exc).__name__}: {exc})"
    if isinstance(meta.get("files"), dict):
        problem = _manifest_damage(folder, meta["files"])
        if problem:
            return problem
    for db in sorted(folder.rglob("*.db")):
        problem = _record_damage(db)
        if problem is not False:
            if problem:
                return problem
            continue
        try:
            con = sqlite3.connect(f"file:{quote(str(db.resolve()))}?mode=ro", uri=True)
            try:
                ok = con.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error as exc:
            ok = str(exc)
        if ok != "ok":
            return f"{db} is damaged ({ok})"
    return None


def _record_damage(db: pathlib.Path):
    """For an sdelip record: what is damaged, or None; False when ``db`` is not an sdelip record."""
    from ...record.format import NotARecordError
    from ...record.read import verify_record
    from ...record.read import check_record_file

    try:
        check_record_file(db)
    except (NotARecordError, OSError):
        return False
    return verify_record(db)


def _result_meta(task_name: str, task_id: str, ref: str, config: dict, out: dict) -> dict:
    """The contents of ``result.json``: the task, its value, and where and how long it ran."""
    return {"name": task_name, "id": task_id, "fn": ref, "config": config, "value": out["value"],
            "seconds": out["seconds"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": out.get("host"), "pid": out.get("pid"), "nice": out.get("nice")}


def _finish(staging: pathlib.Path, final: pathlib.Path, meta: dict) -> None:
    """Write ``result.json`` (with the manifest of the task's files) last into ``staging`` and rename it to ``final``."""
    meta = {**meta, "files": manifest(staging)}
    (staging / RESULT_FILE).write_text(json.dumps(meta, indent=1, allow_nan=True))
    if final.exists():  # an incomplete folder (no result.json) left by hand or an older version
        shutil.rmtree(final)
    os.replace(staging, final)


def _new_staging(root: pathlib.Path, task_id: str) -> pathlib.Path:
    path = root / _STAGING / f"{task_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def _clear_stale_staging(root: pathlib.Path, task_id: str) -> None:
    """Remove staging folders that an earlier, killed sweep left for this task."""
    staging = root / _STAGING
    if staging.is_dir():
        for p in staging.glob(f"{task_id}-*"):
            shutil.rmtree(p, ignore_errors=True)


def _read_files(folder: pathlib.Path) -> dict:
    """relative path → bytes of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_files(folder: pathlib.Path, files: Mapping[str, bytes]) -> None:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _root_is_shared(root: str, token: Optional[str]) -> bool:
    """Whether this process sees the driver's ``root`` (the token file holds the driver's token)."""
    if token is None:
        return False
    try:
        return (pathlib.Path(root) / _TOKEN_FILE).read_text() == token
    except OSError:
        return False


def _store_returned(task: Task, root: pathlib.Path, out: dict) -> pathlib.Path:
    """Write the record folder of a task whose worker returned its files."""
    staging = _new_staging(root, task.id)
    _write_files(staging, out["files"])
    final = root / task.id
    _finish(staging, final, _result_meta(task.name, task.id, task.reference, task.config, out))
    return final


def _write_tokens(roots: Iterable[pathlib.Path], shared: Optional[bool]) -> dict:
    """Create the roots and their token files; returns root → token (None when not shared)."""
    tokens = {}
    for r in roots:
        r.mkdir(parents=True, exist_ok=True)
        if shared is False:
            tokens[r] = None
            continue
        token = uuid.uuid4().hex
        (r / _TOKEN_FILE).write_text(token)
        tokens[r] = token
    return tokens


def _write_failures(keyed: Sequence[tuple], roots: dict, failures: dict) -> None:
    """``<root>/failures.json`` per root: this sweep's failures there (removed when none)."""
    by_root: dict = {}
    for k, _ in keyed:
        by_root.setdefault(roots[k], [])
    for k, f in failures.items():
        by_root[roots[k]].append({"name": f.task.name, "id": f.task.id, "fn": f.task.reference,
                                     "config": f.task.config, "error": f.error, "traceback": f.traceback})
    for root, entries in by_root.items():
        path = root / FAILURES_FILE
        if entries:
            path.write_text(json.dumps(entries, indent=1, allow_nan=True))
        elif path.exists():
            path.unlink()
