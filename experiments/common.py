"""Running an experiment script: scales, its sweep of tasks, output folders (tables: :mod:`reporting`).

Every script in ``experiments/`` has a ``--quick`` scale (default; minutes on a 2-core
CPU with the bundled data) and a ``--paper`` scale (the paper's settings, for a GPU and
the real datasets), writes its records, PNG figures and a summary table (CSV and
Markdown) into ``--out`` (default ``experiments/out/<name>``), and states which data
it used in the table and in ``summary.md``.

A script describes its runs as tasks and its tables and figures as a reduce step, and
:func:`run_experiment` joins them: ``tasks(args) -> list[sdelip.workbench.sweep.Task]`` (one
independent run each), ``reduce(args, results, out) -> dict`` (reads the runs' record
folders and values, writes the summaries). The runs go through
:func:`sdelip.workbench.sweep.run_sweep` (on Ray with one task per core by default, in this
process with ``--workers 1``), with record folders in ``<out>/records/``, so a stopped
sweep resumes where it stopped.

The module is one idea, running an experiment script as a sweep, and holds its parts:
the command line (:func:`parser`, :func:`add_sweep_arguments`, :func:`pick`), the run
(:func:`run_experiment`, :func:`run_sweep_for`, :func:`failure_report`, the thread
settings, :func:`output_dir`), the task that most scripts sweep (:func:`train_task`,
:func:`task_gpus`) and reading its results back (:func:`record_path`,
:func:`runtime_note`). It stays one module on purpose: a task's id hashes its function's
module and name, so moving :func:`train_task` elsewhere would give every cached run of
fig2–fig7 a new id and rerun it. The tables are :mod:`reporting`'s, the small fits
:mod:`fits`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every experiment shares."""
    p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="scale", action="store_const", const="quick",
                       help="minutes on a 2-core CPU with the bundled data (default)")
    scale.add_argument("--paper", dest="scale", action="store_const", const="paper",
                       help="the paper's settings (GPU and the real datasets recommended)")
    scale.add_argument("--tiny", dest="scale", action="store_const", const="tiny",
                       help="seconds; for smoke tests only (numbers are not meaningful)")
    p.set_defaults(scale="quick")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default experiments/out/{name})")
    p.add_argument("--data-root", default=None, help="torchvision data folder (MNIST, CIFAR)")
    p.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


#: Environment variable holding the default of ``--workers`` (tests/conftest.py sets it to 1).
WORKERS_ENV = "SDELIP_SWEEP_WORKERS"


def add_sweep_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--workers``, ``--address`` and ``--fresh`` (how the runs are executed)."""
    default = os.environ.get(WORKERS_ENV)
    p.add_argument("--workers", type=int, default=int(default) if default else None,
                   help="runs at a time: 1 runs them in this process without Ray; N > 1 on a local Ray "
                        f"instance (default: ${WORKERS_ENV}, else one per core on Ray)")
    p.add_argument("--address", default=None,
                   help="address of a Ray cluster to run on (e.g. 'auto' on a node of it, or host:6379)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore complete records from an earlier sweep (default: skip them, i.e. resume)")
    return p


def sweep_threads(scale: str) -> Optional[int]:
    """Torch threads per run: 1 at tiny/quick scale unless OMP_NUM_THREADS says otherwise."""
    if scale == "paper":
        return None
    return int(os.environ["OMP_NUM_THREADS"]) if "OMP_NUM_THREADS" in os.environ else 1


def run_sweep_for(tasks, root, args, label: str):
    """:func:`sdelip.workbench.sweep.run_sweep` with the command line's engine options."""
    from sdelip.workbench.sweep import run_sweep

    return run_sweep(tasks, root, workers=args.workers, address=args.address, progress=not args.no_progress,
                     fresh=args.fresh, threads=sweep_threads(args.scale), python_path=[HERE], label=label)


def failure_report(outcome) -> str:
    """Lines naming every failed task with its config and error."""
    lines = [f"{len(outcome.failures)} of {len(outcome.failures) + len(outcome.results)} runs failed:"]
    for f in outcome.failures.values():
        lines.append("  " + f.describe())
        if f.traceback:
            lines.append("    " + f.traceback.strip().splitlines()[-1])
    return "\n".join(lines)


def run_experiment(name: str, description: str, tasks: Callable, reduce: Callable, argv=None,
                   add_arguments: Optional[Callable] = None) -> dict:
    """Parse the command line, run the tasks as a sweep, and reduce their records.

    Args:
        name: the script's name (output folder ``experiments/out/<name>`` by default).
        description: the first line of ``--help``.
        tasks: ``tasks(args) -> list[Task]``.
        reduce: ``reduce(args, results, out) -> dict``; ``results`` maps each task's name
            to its :class:`sdelip.workbench.sweep.TaskResult`.
        argv: the arguments (None: ``sys.argv[1:]``).
        add_arguments: ``add_arguments(parser)`` for the script's own options.

    Returns:
        What ``reduce`` returned.

    Raises:
        SystemExit: when a run failed (after every other run finished; nothing is
            reduced). The message names each failed run with its config and error; the
            complete runs' records stay and a rerun resumes from them.
    """
    p = add_sweep_arguments(parser(name, description))
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    out = output_dir(name, args)
    args.out = out
    single_thread(args)
    outcome = run_sweep_for(tasks(args), out / "records", args, label=name)
    if not outcome.ok:
        raise SystemExit(f"[{name}] {failure_report(outcome)}\n[{name}] nothing reduced; the failures are in "
                         f"{out / 'records' / 'failures.json'}; rerun to retry only the missing runs")
    return reduce(args, outcome.results, out)


def train_task(config: dict, workdir: Path) -> dict:
    """Task function of one :func:`sdelip.workbench.train.train` run, its record written into ``workdir``.

    Args:
        config: ``{"train": <TrainConfig keyword arguments except record, in the flat spelling of
            TrainConfig.from_flat: the tracker's options as track_every, engine, split, ...>, "n_train": bool}``;
            with ``track`` the record is ``workdir/record.db``; with ``n_train`` the value
            also holds the training-set size.
        workdir: the task's folder.

    Returns:
        The run's data, data source, steps, final loss, accuracies, K at the start and end,
        the record's file name (None untracked) and the MLP's layer sizes (None for others).
    """
    import warnings

    from sdelip.workbench.train import TrainConfig, prepare_data, train

    kwargs = dict(config["train"])
    record = "record.db" if kwargs.get("track", True) else None
    cfg = TrainConfig.from_flat({**kwargs, "record": str(Path(workdir) / record) if record else None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the data-fallback notice is stated in every summary instead
        res = train(cfg, progress=False)
        n_train = len(prepare_data(cfg)) if config.get("n_train") else None
    sizes = getattr(res.model, "sizes", None)
    return {"data": res.data, "data_source": res.data_source, "steps": res.steps, "final_loss": res.final_loss,
            "train_accuracy": res.train_accuracy, "test_accuracy": res.test_accuracy,
            "K_initial": res.K_initial, "K_final": res.K_final, "record": record, "n_train": n_train,
            "model_sizes": list(sizes) if sizes is not None else None}


def task_gpus(args) -> float:
    """GPUs a run asks Ray for: one with ``--device cuda``, none on the CPU."""
    return 1.0 if str(args.device).startswith("cuda") else 0.0


def record_path(result) -> Path:
    """The SQLite record of a :func:`train_task` result."""
    if result.value.get("record") is None:
        raise ValueError(f"run {result.task.name!r} was not tracked: it has no record")
    return Path(result.dir) / result.value["record"]


def runtime_note(results: Mapping) -> str:
    """'Runtime N s (sum over M runs; ...)' for a reduce step's notes."""
    total = sum(r.seconds for r in results.values())
    return (f"Runtime {total:.0f} s summed over the {len(results)} runs "
            "(one CPU thread each; wall time depends on --workers)")


def output_dir(name: str, args) -> Path:
    out = args.out if args.out is not None else HERE / "out" / name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def pick(scale: str, **choices):
    """``pick(args.scale, tiny=..., quick=..., paper=...)``: the value for the scale."""
    if scale not in choices:
        raise KeyError(f"no setting for scale {scale!r}")
    return choices[scale]


def single_thread(args) -> None:
    """Use one CPU thread at tiny/quick scale unless OMP_NUM_THREADS says otherwise.

    On a small shared CPU, multithreaded LAPACK under contention made one float64 SVD of
    a 512×784 matrix take seconds instead of 0.07 s; one thread avoids that.
    """
    import os

    import torch

    if args.scale != "paper" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
