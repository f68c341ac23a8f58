"""Run a sweep of independent tasks in-process or on Ray, with resumable record folders.

A :class:`Task` is one run of an experiment: a top-level function of an importable
module, ``fn(config, workdir) -> dict``, and the JSON-able ``config`` that determines
its result. :func:`run_sweep` runs a list of tasks and gives every task a record folder
``<root>/<task.id>/`` holding the files ``fn`` wrote into its ``workdir`` and, written
last, ``result.json`` (the returned dict, the task's name and config, the seconds). A
folder is written in ``<root>/.staging/`` and renamed into place when complete, so a
sweep that was killed resumes by skipping the tasks whose folder exists and running
the others. A folder counts as complete only when every file listed in its
``result.json`` (sizes and SHA-256 of what the task wrote) is present and unchanged and
its records pass their row checksums; one sweep at a time writes a root (``<root>/.sweep.lock``).

Engines:

* ``workers=1`` without ``address``: in this process, one task after the other, without
  importing Ray (debugging, tests).
* otherwise Ray (``pip install "sdelip[sweep]"``): a local instance running ``workers``
  tasks at a time (default: one per core), or the cluster at ``address``. A task with
  ``gpus > 0`` asks Ray for that many GPUs. When the worker cannot see ``root`` (another
  node without a shared file system) it runs in a temporary folder and returns the
  files with the result; the driver writes the record folder.

A task that raises is reported (:attr:`SweepOutcome.failures`, and
``<root>/failures.json``) with its name, config, error and traceback; the other tasks
go on.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import time
from typing import Optional, Sequence, Union

from .backends import _run_in_process, _run_on_ray, execute  # noqa: F401  (execute: what a worker runs)
from .progress import Progress, _say  # noqa: F401
from .storage import FAILURES_FILE, RESULT_FILE, _roots, _write_failures, _write_tokens, damage, load_result, lock_roots
from .tasks import (  # noqa: F401
    SweepOutcome,
    Task,
    TaskFailure,
    TaskResult,
    _display,
    _keyed,
    fn_reference,
    resolve_reference,
)

__all__ = ["Task", "TaskResult", "TaskFailure", "SweepOutcome", "run_sweep", "fn_reference", "load_result", "damage",
           "RESULT_FILE", "FAILURES_FILE"]


def run_sweep(tasks, root, *, workers: Optional[int] = None, address: Optional[str] = None,
              progress: bool = True, fresh: bool = False, threads: Optional[int] = None,
              shared: Optional[bool] = None, python_path: Sequence[Union[str, pathlib.Path]] = (),
              label: str = "sweep") -> SweepOutcome:
    """Run the tasks whose record folder is not complete; returns every task's result.

    Args:
        tasks: a list of tasks (names unique; results keyed by name), or a mapping key →
            task (results keyed by key, e.g. ``(experiment, name)`` for one sweep over
            several experiments; names then need to be unique per root only).
        root: the folder holding the record folders ``<root>/<task.id>/``, or a mapping
            key → such a folder.
        workers: tasks at a time. ``1`` without ``address`` runs in this process without
            importing Ray; ``None`` means one per core of a local Ray instance (all of a
            cluster's with ``address``).
        address: a Ray cluster's address (``"auto"`` on a node of it, ``"host:6379"``,
            ``"ray://host:10001"``); None starts a local instance.
        progress: a tqdm bar on a TTY; False (or not a TTY): one line per finished task.
        fresh: ignore complete record folders (run every task again, replacing them).
        threads: ``torch.set_num_threads`` in each task (None: leave the default). Ray
            workers also get ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set to it.
        shared: whether workers see ``root``; None detects it per task (a token file).
            False makes the workers return the files (as on nodes without a shared file
            system).
        python_path: folders Ray workers need on their ``PYTHONPATH`` to import the
            tasks' modules (e.g. ``experiments/``); the checkout of :mod:`sdelip` is added.
        label: prefix of the progress lines.

    Returns:
        :class:`SweepOutcome`. Failures are also written to ``<root>/failures.json``
        (and that file is removed when a sweep has none there).

    Raises:
        ValueError: duplicate task names (or record folders), or a bad ``workers``.
        sdelip.record.RecordLockedError: another sweep is running on one of the roots
            (one sweep per output folder; the message names its process).
        ImportError: Ray is needed (``workers != 1`` or ``address``) but not installed.
    """
    keyed = _keyed(tasks)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    start = time.perf_counter()
    roots = _roots(keyed, root)
    locks = lock_roots(roots.values())  # one sweep per output folder
    try:
        return _run_locked(keyed, roots, start, workers=workers, address=address, progress=progress, fresh=fresh,
                           threads=threads, shared=shared, python_path=python_path, label=label)
    finally:
        for lock in locks:
            lock.release()


def _run_locked(keyed, roots, start, *, workers, address, progress, fresh, threads, shared, python_path,
                label) -> SweepOutcome:
    tokens = _write_tokens(set(roots.values()), shared)
    done: dict = {}
    todo: list[tuple] = []
    for k, t in keyed:
        folder = roots[k] / t.id
        if fresh and folder.exists():
            shutil.rmtree(folder)
        if (folder / RESULT_FILE).is_file():
            problem = damage(folder)
            if problem is not None:  # re-run it: _finish replaces the folder
                _say(f"[{label}] task {_display(k)!r} (id {t.id}) is damaged: {problem}; running it again")
                (folder / RESULT_FILE).unlink(missing_ok=True)
        res = load_result(t, folder)
        if res is not None:
            done[k] = res
        else:
            todo.append((k, t))
    skipped = tuple(done)
    if skipped:
        _say(f"[{label}] {len(skipped)} of {len(keyed)} tasks already complete (skipped); {len(todo)} to run")
    bar = progress and sys.stderr.isatty()
    failures: dict = {}
    if todo:
        engine = _run_in_process if (workers == 1 and address is None) else _run_on_ray
        engine(todo, roots, tokens, done, failures, workers=workers, address=address, threads=threads,
               bar=bar, label=label, python_path=python_path)
    _write_failures(keyed, roots, failures)
    return SweepOutcome(results={k: done[k] for k, _ in keyed if k in done},
                        failures={k: failures[k] for k, _ in keyed if k in failures},
                        skipped=skipped, seconds=time.perf_counter() - start)
