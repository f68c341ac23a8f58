"""Sweep tasks and their outcomes: what a task is (a function reference and its config) and what it returned."""

from __future__ import annotations

import hashlib
import importlib
import json
import pathlib
import sys
from typing import Callable, Mapping

import attrs


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


def _display(key) -> str:
    """A key as shown in messages: tuples joined with '/'."""
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)
