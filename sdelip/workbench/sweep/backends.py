"""Where a sweep's tasks run: in this process, or on Ray (local or a cluster)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import time
import traceback
from typing import Optional, Sequence

from .progress import Progress
from .storage import (  # noqa: F401
    _clear_stale_staging,
    _finish,
    _new_staging,
    _read_files,
    _result_meta,
    _root_is_shared,
    _store_returned,
    load_result,
)
from .tasks import Task, TaskFailure, _display, resolve_reference


#: Ray's setting of its workers' niceness (read from the environment when a local instance starts).
_RAY_NICENESS = "RAY_worker_niceness"


def _call(ref: str, name: str, config: dict, workdir: pathlib.Path) -> dict:
    """Run ``fn(config, workdir)``; returns ``{"ok", "value"|"error"+"traceback", "seconds"}``."""
    start = time.perf_counter()
    where = {"host": os.uname().nodename, "pid": os.getpid(), "nice": os.nice(0)}
    try:
        value = resolve_reference(ref)(config, workdir)
        json.dumps(value, allow_nan=True)
        if not isinstance(value, dict):
            raise TypeError(f"fn {ref} returned {type(value).__name__}, not a dict")
        return {"ok": True, "value": value, "seconds": time.perf_counter() - start, **where}
    except BaseException as exc:  # noqa: BLE001 - every failure is reported with the task's config
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - start}


def execute(ref: str, name: str, task_id: str, config: dict, root: str, token: Optional[str],
            threads: Optional[int] = None) -> dict:
    """Run one task where the call lands; the body of the in-process engine and of a Ray task.

    With ``root`` visible (the driver's token found there), ``fn`` writes into a staging
    folder under ``root`` that becomes ``<root>/<task_id>`` on success. Otherwise ``fn``
    runs in a temporary folder whose files come back as ``"files"`` (relative path →
    bytes) for the driver to write.

    Args:
        ref: ``"module:qualname"`` of the task's function.
        name: the task's name; task_id: its id.
        config: the task's config.
        root: the driver's folder for this task's record folder.
        token: the driver's token in ``<root>/.sweep-token``; None forces the
            files-returned mode.
        threads: ``torch.set_num_threads`` for the task (None: leave as is).

    Returns:
        dict with ``ok``, ``seconds``, ``value`` or ``error`` and ``traceback``, and
        ``files`` when the record folder was not written here.
    """
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    shared = _root_is_shared(root, token)
    if shared:
        root_path = pathlib.Path(root)
        _clear_stale_staging(root_path, task_id)
        workdir = _new_staging(root_path, task_id)
    else:
        workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"sweep-{task_id}-"))
    out = _call(ref, name, config, workdir)
    if not out["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
        return out
    if shared:
        _finish(workdir, pathlib.Path(root) / task_id, _result_meta(name, task_id, ref, config, out))
        out["written"] = True
    else:
        out["files"] = _read_files(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def _run_in_process(todo, roots, tokens, done, failures, *, threads, bar, label, **_) -> None:
    """One task after the other in this process (no Ray)."""
    prog = Progress(len(todo), 1, bar, label)
    try:
        for k, t in todo:
            prog.submitted()
            root = roots[k]
            out = execute(t.reference, t.name, t.id, t.config, str(root), tokens[root], threads)
            _record(k, t, root, out, done, failures, prog)
    finally:
        prog.close()


def _runtime_env(python_path: Sequence, threads: Optional[int]) -> dict:
    """Ray runtime_env: the workers import sdelip and the tasks' modules; one thread each."""
    here = pathlib.Path(__file__).resolve().parents[2]  # the checkout holding sdelip/ (this is sdelip/sweep/…)
    paths = [str(pathlib.Path(p).resolve()) for p in python_path] + [str(here)]
    existing = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": os.pathsep.join(paths + ([existing] if existing else []))}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return {"env_vars": env}


def _run_on_ray(todo, roots, tokens, done, failures, *, workers, address, threads, bar, label,
                python_path) -> None:
    """Submit every task to Ray and book them as they finish."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("running a sweep with workers != 1 or an address needs Ray: "
                          "pip install 'sdelip[sweep]' (or use workers=1 for in-process runs)") from exc
    started_here = not ray.is_initialized()
    if started_here:
        runtime_env = _runtime_env(python_path, threads)
        if address is not None:  # a cluster (or a Ray Client address): only what connecting accepts
            ray.init(address=address, runtime_env=runtime_env)
        else:
            # Ray starts its workers at nice 15; next to other jobs at nice 0 (a shared machine) they then
            # get a small share of the CPU (docs/performance.md). Run them at normal priority.
            os.environ.setdefault(_RAY_NICENESS, "0")
            ray.init(num_cpus=workers or os.cpu_count(), runtime_env=runtime_env, include_dashboard=False,
                     configure_logging=False)
    capacity = workers or int(ray.cluster_resources().get("CPU", 1))
    remote = ray.remote(execute)
    prog = Progress(len(todo), capacity, bar, label)
    pending = {}
    try:
        for k, t in todo:
            root = roots[k]
            ref = remote.options(num_cpus=1, num_gpus=t.gpus, max_retries=0).remote(
                t.reference, t.name, t.id, t.config, str(root), tokens[root], threads)
            pending[ref] = (k, t)
        prog.submitted(len(pending))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                k, t = pending.pop(r)
                try:
                    out = ray.get(r)
                except Exception as exc:  # noqa: BLE001 - a worker that died (OOM, node loss)
                    out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": "", "seconds": 0.0}
                _record(k, t, roots[k], out, done, failures, prog)
    finally:
        prog.close()
        if started_here:
            ray.shutdown()


def _record(key, task: Task, root: pathlib.Path, out: dict, done: dict, failures: dict, prog: Progress) -> None:
    """Book one finished task: store its returned files, load its result, or note the failure."""
    if out.get("ok"):
        try:
            folder = root / task.id if out.get("written") else _store_returned(task, root, out)
            done[key] = load_result(task, folder)
            prog.finished(_display(key), True, out["seconds"])
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk on the driver
            out = {"ok": False, "error": f"storing the record folder failed: {type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(), "seconds": out.get("seconds", 0.0)}
    failures[key] = TaskFailure(task=task, error=out["error"], traceback=out.get("traceback", ""))
    prog.finished(_display(key), False, out.get("seconds", 0.0), out["error"])
