"""Run a sweep of independent tasks in-process or on Ray, with resumable record folders.

A :class:`Task` is one run of an experiment: a top-level function of an importable
module, ``fn(config, workdir) -> dict``, and the JSON-able ``config`` that determines
its result. :func:`run_sweep` runs a list of tasks and gives every task a record folder
``<root>/<task.id>/`` holding the files ``fn`` wrote into its ``workdir`` and, written
last, ``result.json`` (the returned dict, the task's name and config, the seconds). A
folder is written in ``<root>/.staging/`` and renamed into place when complete, so a
sweep that was killed resumes by skipping the tasks whose folder exists and running
the others.

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

import hashlib
import importlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import attrs

__all__ = ["Task", "TaskResult", "TaskFailure", "SweepOutcome", "run_sweep", "fn_reference", "load_result", "damage",
           "RESULT_FILE", "FAILURES_FILE"]

#: The file that marks a record folder as complete (written last).
RESULT_FILE = "result.json"
#: The file, in each root, listing the tasks of the last sweep that failed.
FAILURES_FILE = "failures.json"
_STAGING = ".staging"
_TOKEN_FILE = ".sweep-token"
#: Ray's setting of its workers' niceness (read from the environment when a local instance starts).
_RAY_NICENESS = "RAY_worker_niceness"


def fn_reference(fn: Callable) -> str:
    """``"module:qualname"`` of a top-level function, by which a worker imports it.

    A function defined in a script run as ``__main__`` is named by the script's file
    stem (``experiments/fig4_sampling.py`` → ``fig4_sampling``), as is one loaded from its
    path under another module name, so that its tasks have
    the same id whether the script runs alone or from ``experiments/run_all``, and a Ray
    worker (with the script's folder on its ``PYTHONPATH``) can import it.

    Raises:
        ValueError: for a lambda, a nested function or a function without a module.
    """
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname or "." in qualname:
        raise ValueError(f"a task's fn must be a top-level function of an importable module, got {fn!r}")
    file = getattr(sys.modules.get(module), "__file__", None)
    if file is None and module != "__main__":  # a module executed from its path without registering it
        code_file = getattr(getattr(fn, "__code__", None), "co_filename", "")
        file = code_file if code_file.endswith(".py") else None
    if module == "__main__" and not file:
        raise ValueError(f"fn {qualname} is defined in an interactive __main__; put it in a module")
    if file and "." not in module and module != pathlib.Path(file).stem:
        module = pathlib.Path(file).stem  # a script run as __main__ or loaded from its path under another name
    return f"{module}:{qualname}"


def resolve_reference(ref: str) -> Callable:
    """The function named by :func:`fn_reference`'s ``"module:qualname"``."""
    module, _, qualname = ref.partition(":")
    return getattr(importlib.import_module(module), qualname)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


@attrs.frozen
class Task:
    """One independent run of a sweep.

    Attributes:
        name: unique within a sweep and readable, e.g. ``"seed=3"``.
        fn: a top-level function of an importable module, ``fn(config, workdir) ->
            dict``; it writes its files into ``workdir`` and returns a JSON-able dict.
        config: JSON-able; everything that determines the result.
        gpus: GPUs to ask Ray for (ignored in-process).
    """

    name: str
    fn: Callable[[dict, pathlib.Path], dict]
    config: dict
    gpus: float = 0.0

    def __attrs_post_init__(self):
        fn_reference(self.fn)  # refuses lambdas and nested functions early, naming them
        try:
            _canonical(self.config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"task {self.name!r}: config is not JSON-able ({exc}): {self.config!r}") from None

    @property
    def reference(self) -> str:
        """``"module:qualname"`` of :attr:`fn`."""
        return fn_reference(self.fn)

    @property
    def id(self) -> str:
        """A stable short hash of (fn's module and qualname, name, config): the record folder's name."""
        key = _canonical({"fn": self.reference, "name": self.name, "config": self.config})
        return hashlib.sha256(key.encode()).hexdigest()[:16]


@attrs.frozen
class TaskResult:
    """A completed task.

    Attributes:
        task: the task.
        value: what ``task.fn`` returned (read back from ``result.json``).
        dir: the task's complete record folder, with every file ``fn`` wrote.
        seconds: the run time of ``fn`` (of the run that wrote the folder).
    """

    task: Task
    value: dict
    dir: pathlib.Path
    seconds: float


@attrs.frozen
class TaskFailure:
    """A task that raised (or whose worker died).

    Attributes:
        task: the task (its name and config say which run failed).
        error: ``"ExceptionType: message"``.
        traceback: the formatted traceback ("" when the worker died without one).
    """

    task: Task
    error: str
    traceback: str

    def describe(self) -> str:
        """A few lines naming the task, its config and the error."""
        return f"task {self.task.name!r} (id {self.task.id}, config {_canonical(self.task.config)}) failed: {self.error}"


@attrs.frozen
class SweepOutcome:
    """What :func:`run_sweep` produced.

    Attributes:
        results: task name (or key) → :class:`TaskResult`, for every completed task
            (skipped ones included), in the order of the tasks.
        failures: task name (or key) → :class:`TaskFailure`.
        skipped: names (or keys) of the tasks whose record folder was already complete.
        seconds: wall time of the sweep.
    """

    results: dict
    failures: dict
    skipped: tuple
    seconds: float

    @property
    def ok(self) -> bool:
        """True when no task failed."""
        return not self.failures


# ---------------------------------------------------------------------------------------
# record folders
# ---------------------------------------------------------------------------------------


def _keyed(tasks) -> list[tuple]:
    """(key, task) pairs: a list of tasks is keyed by name, a mapping by its keys."""
    if isinstance(tasks, Mapping):
        return list(tasks.items())
    tasks = list(tasks)
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"task names must be unique within a sweep; repeated: {dup}")
    return [(t.name, t) for t in tasks]


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


def _display(key) -> str:
    """A key as shown in messages: tuples joined with '/'."""
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)


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


def damage(folder: pathlib.Path) -> Optional[str]:
    """What is wrong with a record folder that has a ``result.json``, or None when it is sound.

    Checks that ``result.json`` parses with a value, and that every SQLite file in the
    folder (``*.db``, e.g. a tracker record) passes SQLite's ``quick_check`` (a truncated
    or corrupted record fails it).
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
    for db in sorted(folder.rglob("*.db")):
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


def _result_meta(task_name: str, task_id: str, ref: str, config: dict, out: dict) -> dict:
    """The contents of ``result.json``: the task, its value, and where and how long it ran."""
    return {"name": task_name, "id": task_id, "fn": ref, "config": config, "value": out["value"],
            "seconds": out["seconds"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": out.get("host"), "pid": out.get("pid"), "nice": out.get("nice")}


def _finish(staging: pathlib.Path, final: pathlib.Path, meta: dict) -> None:
    """Write ``result.json`` last into ``staging`` and rename it to ``final``."""
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


# ---------------------------------------------------------------------------------------
# executing one task (in-process, or inside a Ray worker)
# ---------------------------------------------------------------------------------------


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


def _store_returned(task: Task, root: pathlib.Path, out: dict) -> pathlib.Path:
    """Write the record folder of a task whose worker returned its files."""
    staging = _new_staging(root, task.id)
    _write_files(staging, out["files"])
    final = root / task.id
    _finish(staging, final, _result_meta(task.name, task.id, task.reference, task.config, out))
    return final


# ---------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------


class Progress:
    """Runs done / running / failed with an ETA: a tqdm bar on a TTY, else a line per finished task.

    Args:
        total: tasks to run (skipped ones excluded).
        workers: how many run at a time (for the "running" count); None when unknown.
        bar: use a tqdm bar (else one plain line per finished task).
        label: prefix of the lines.
        stream: where to write.
    """

    def __init__(self, total: int, workers: Optional[int], bar: bool, label: str = "sweep", stream=None):
        self.total, self.workers, self.label = total, workers, label
        self.done = self.failed = 0
        self.in_flight = 0
        self.start = time.perf_counter()
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        if bar and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=label, unit="task", file=self.stream, dynamic_ncols=True)
            self._refresh()

    @property
    def running(self) -> int:
        """Tasks running now (at most ``workers`` of those submitted)."""
        return self.in_flight if self.workers is None else min(self.in_flight, self.workers)

    def eta_seconds(self) -> Optional[float]:
        """Remaining time at the mean rate so far (None before the first finished task)."""
        finished = self.done + self.failed
        if finished == 0:
            return None
        return (time.perf_counter() - self.start) / finished * (self.total - finished)

    def submitted(self, n: int = 1) -> None:
        """``n`` tasks started (or were queued)."""
        self.in_flight += n
        self._refresh()

    def finished(self, name: str, ok: bool, seconds: float, error: str = "") -> None:
        """One task finished (``ok``) or failed."""
        self.in_flight -= 1
        if ok:
            self.done += 1
        else:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(1)
            self._refresh()
            if not ok:
                self._bar.write(f"[{self.label}] FAILED {name}: {error}", file=self.stream)
        else:
            self.stream.write(self.line(name, ok, seconds, error) + "\n")
            self.stream.flush()

    def line(self, name: str, ok: bool, seconds: float, error: str = "") -> str:
        """The plain line for a finished task."""
        eta = self.eta_seconds()
        status = "ok" if ok else f"FAILED ({error})"
        return (f"[{self.label}] {self.done + self.failed}/{self.total} {name}: {status} in {seconds:.1f} s; "
                f"done {self.done}, running {self.running}, failed {self.failed}, "
                f"ETA {_hms(eta) if eta is not None else '?'}")

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"running {self.running}, failed {self.failed}", refresh=True)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ---------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------


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
        ImportError: Ray is needed (``workers != 1`` or ``address``) but not installed.
    """
    keyed = _keyed(tasks)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    start = time.perf_counter()
    roots = _roots(keyed, root)
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


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    here = pathlib.Path(__file__).resolve().parent.parent  # the checkout holding sdelip/
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
            # get a small share of the CPU (measured: 1 s tasks took 33 s). Run them at normal priority.
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
