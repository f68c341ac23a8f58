"""The ``sdelip`` command line: ``demo``, ``track``, ``predict``, ``simulate``, ``plot``, ``info``, ``export``, ``copy``.

Run ``sdelip <command> --help`` for each command's options. Errors are printed as one
message (``sdelip: error: ...``) with exit status 2; ``--traceback`` shows the full
Python traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ._records import cmd_copy, cmd_export, cmd_info, cmd_plot, cmd_predict, cmd_simulate, prediction_summary, terms_summary
from ._training import THREADS_HELP, _add_training_options, _threads, cli_option, cmd_demo, cmd_track, default_checkpoint

__all__ = ["main", "build_parser", "terms_summary", "prediction_summary", "cli_option", "default_checkpoint"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdelip",
        description="Track, predict and simulate the Lipschitz dynamics of neural networks under SGD "
                    "(Thm 14–17 of 'Optimization-Induced Dynamics of Lipschitz Continuity in Neural Networks').",
    )
    p.add_argument("--traceback", action="store_true", help="show full Python tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="the main job: train the MLP on bundled MNIST with tracking, simulate, plot",
                       description="Train the paper's MLP on the bundled MNIST digits with every term tracked, "
                                   "predict K(t) (Thm 16–17), simulate the SDE, and write a figure and tables.")
    d.add_argument("--out", default="sdelip-demo", help="output folder (default ./sdelip-demo)")
    d.add_argument("--steps", type=int, default=300, help="SGD steps (default 300)")
    d.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    d.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default 128)")
    d.add_argument("-n", "--trajectories", type=int, default=10000, help="SDE trajectories (default 10,000)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--data-root", default=None, help="MNIST folder; the bundled digits are used if absent")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--threads", type=_threads, default=None, help=THREADS_HELP)
    d.set_defaults(func=cmd_demo)

    tr = sub.add_parser("track", help="train with live tracking into a record",
                        description="Train with plain SGD and record every Thm 14–15 term per step.")
    tr.add_argument("--record", required=True, help="SQLite record to write (e.g. runs/mlp.db)")
    tr.add_argument("--overwrite", action="store_true",
                    help="start a new run: replace an existing record and checkpoint")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--no-checkpoint", action="store_true",
                    help="write no checkpoint (a killed run then cannot be continued)")
    _add_training_options(tr)
    tr.set_defaults(func=cmd_track)

    pr = sub.add_parser("predict", help="Thm 16–17 prediction vs observation from a record")
    pr.add_argument("record")
    pr.add_argument("--csv", default=None, help="write the full prediction table here")
    pr.add_argument("--include-degenerate", action="store_true",
                    help="use the terms of degenerate steps (repeated top singular value) in the prediction")
    _add_record_reading_options(pr, "the prediction")
    pr.set_defaults(func=cmd_predict)

    si = sub.add_parser("simulate", help="Monte Carlo of the reduced Z-SDE with a record's coefficients")
    si.add_argument("record")
    si.add_argument("-n", "--trajectories", type=int, default=10000, help="SDE trajectories (default 10,000)")
    si.add_argument("--lr", type=float, default=None,
                    help="the step η of a record with one learning rate (default: the record's own; refused for a "
                         "record whose learning rate varies, which is simulated on its own η(t))")
    si.add_argument("--seed", type=int, default=0)
    si.add_argument("--device", default="cpu")
    si.add_argument("--csv", default=None, help="write mean, variance and quantiles over time here")
    si.add_argument("--no-progress", action="store_true")
    si.add_argument("--threads", type=_threads, default=None, help=THREADS_HELP)
    si.add_argument("--include-degenerate", action="store_true",
                    help="use the terms of degenerate steps (repeated top singular value) in the simulation")
    _add_record_reading_options(si, "the simulation")
    si.set_defaults(func=cmd_simulate)

    pl = sub.add_parser("plot", help="figure from a record (prediction, terms, κ split)")
    pl.add_argument("record")
    pl.add_argument("--out", default=None, help="PNG path (default: next to the record)")
    pl.add_argument("--simulate", nargs="?", type=int, const=-1, default=0, metavar="N",
                    help="add the band of a Monte Carlo simulation of the reduced SDE (with -n/--trajectories "
                         "trajectories; the old spelling --simulate N still sets their number)")
    pl.add_argument("-n", "--trajectories", type=int, default=1000,
                    help="SDE trajectories of --simulate (default 1,000)")
    pl.add_argument("--seed", type=int, default=0, help="seed of --simulate's Brownian motion")
    pl.add_argument("--no-progress", action="store_true", help="no progress bar for --simulate")
    pl.add_argument("--title", default=None, help="figure title (default: what the run was, from its metadata)")
    pl.add_argument("--smooth", type=int, default=1, help="moving-average window for the terms")
    pl.add_argument("--include-degenerate", action="store_true",
                    help="use the terms of degenerate steps (repeated top singular value) in the prediction and the simulation")
    _add_record_reading_options(pl, "the figure")
    pl.set_defaults(func=cmd_plot)

    inf = sub.add_parser("info", help="a record's metadata and a summary of its terms")
    inf.add_argument("record")
    inf.add_argument("--json", action="store_true", help="metadata as JSON")
    inf.add_argument("--include-degenerate", action="store_true",
                    help="use the terms of degenerate steps (repeated top singular value) in the averages")
    _add_record_reading_options(inf, "the averages")
    inf.set_defaults(func=cmd_info)

    ex = sub.add_parser("export", help="send a record's rows and metadata to TensorBoard, CSV, W&B or MLflow",
                        description="Export an existing record through the loggers of sdelip.loggers: numbers as "
                                    "scalars/metrics per step, booleans and text as what they are, the metadata "
                                    "as text/config/params.")
    ex.add_argument("record")
    ex.add_argument("--to", required=True, choices=["tensorboard", "csv", "wandb", "mlflow"])
    ex.add_argument("--out", default=None,
                    help="TensorBoard log folder, CSV file, W&B folder or MLflow store folder/URI "
                         "(default: beside the record: RECORD.tb, RECORD.csv, RECORD.wandb, RECORD.mlruns)")
    ex.add_argument("--project", default=None, help="W&B project or MLflow experiment (default sdelip)")
    ex.set_defaults(func=cmd_export)

    cp = sub.add_parser("copy", help="copy a record, also one still being written, into one self-contained file",
                        description="Copy a record with SQLite's online backup API: a consistent snapshot of its "
                                    "committed steps (those still in its -wal file included) as one file. Safe while "
                                    "the run is writing; the source is only read.")
    cp.add_argument("record")
    cp.add_argument("dest", help="the copy (must not exist)")
    cp.set_defaults(func=cmd_copy)
    return p


def _add_record_reading_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--intact-only", action="store_true",
                   help="read what is intact of a damaged record (rows failing their checksum are left out, and named)")
    p.add_argument("--include-diverged", action="store_true",
                   help=f"use the steps from the one where the run diverged on in {what} (K or the loss non-finite "
                        "or 10^6 times the first step's; left out by default)")


def _one_line_warnings() -> None:
    """Show each distinct warning once, on one line, as a notice (no source line)."""
    import warnings

    seen: set = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text in seen:
            return
        seen.add(text)
        text = text[len("sdelip: "):] if text.startswith("sdelip: ") else text
        print(f"sdelip: notice: {text}", file=file or sys.stderr)

    warnings.showwarning = show


def _verb_parsers(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a wrong flag: the verb's own usage, not the top-level one
        verb = _verb_parsers(parser).get(args.command) if args.command else None
        (verb or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    _one_line_warnings()
    if args.command is None:
        parser.print_help()
        return 2
    from ..tracking.signals import Terminated

    try:
        return int(args.func(args) or 0)
    except Terminated as exc:  # SIGTERM, handled like Ctrl-C (sdelip.tracking.signals)
        print(f"sdelip: {exc}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("sdelip: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # errors as messages, not tracebacks
        if args.traceback:
            raise
        print(f"sdelip: error: {exc}", file=sys.stderr)
        return 2



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
