"""The ``sdelip`` command line: ``demo``, ``track``, ``predict``, ``simulate``, ``plot``, ``info``, ``copy``.

Run ``sdelip <command> --help`` for each command's options. Errors are printed as one
message (``sdelip: error: ...``) with exit status 2; ``--traceback`` shows the full
Python traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _print_table(rows, file=None):
    file = sys.stdout if file is None else file
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3e}"
    return "" if v is None else str(v)


def _markdown_table(rows) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _load(record_path, need_rows: bool = True):
    from .record import load_record

    path = Path(record_path)
    if not path.exists():
        raise FileNotFoundError(f"no record at {path}: create one with `sdelip track --record {path}`")
    record = load_record(path)
    if need_rows and record.empty:
        raise ValueError(f"the record {str(path)!r} holds no steps yet (0 rows): nothing to predict, simulate or plot")
    return record


def _degenerate(record, include: bool, what: str):
    """Report the record's degenerate steps and return the record ``what`` uses (module prediction)."""
    from .prediction import degenerate_steps, drop_degenerate

    bad = degenerate_steps(record)
    if not bad:
        return record
    shown = ", ".join(map(str, bad[:8])) + (", …" if len(bad) > 8 else "")
    head = (f"{len(bad)} of {len(record)} steps are degenerate (a layer's top singular value repeated, spectral gap "
            f"below gap_tol, Assumption 11; steps {shown}): ")
    if include:
        print(f"sdelip: notice: {head}their coefficients, undefined by the theory, are used by {what} as recorded "
              "(--include-degenerate)", file=sys.stderr)
        return record
    print(f"sdelip: notice: {head}their coefficients are undefined by the theory and are not used by {what}: a "
          "leading one is dropped, a later one holds the previous step's coefficients (--include-degenerate uses "
          "them)", file=sys.stderr)
    return drop_degenerate(record)


def _check_output(path) -> Path:
    """An output file's folder must exist and be writable: checked before any work is done."""
    import os

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise IsADirectoryError(f"the output {str(path)!r} is a directory; give a file name")
    if not folder.is_dir():
        raise FileNotFoundError(f"the folder {str(folder)!r} of the output {str(path)!r} does not exist; create it "
                                "first (sdelip does not create folders for output files)")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"the folder {str(folder)!r} of the output {str(path)!r} is not writable")
    return path


def _metadata(record_path) -> dict:
    from .record import load_metadata

    return load_metadata(Path(record_path))


def _lr_of(record_path, record) -> float:
    meta = _metadata(record_path)
    lr = meta.get("lr") or meta.get("config", {}).get("lr")
    if lr is None and len(record) > 1:
        steps = record["step"].to_numpy()
        t = record["t"].to_numpy()
        lr = float((t[-1] - t[0]) / (steps[-1] - steps[0]))
    return float(lr)


def prediction_summary(record, pred, at_steps: Optional[Sequence[int]] = None) -> list[dict]:
    """Rows comparing observed K with the Thm 16–17 prediction at a few steps."""
    import numpy as np

    steps = pred["step"].to_numpy()
    if at_steps is None:
        at_steps = sorted({int(steps[0]), *(int(steps[int(q * (len(steps) - 1))]) for q in (0.25, 0.5, 0.75)),
                           int(steps[-1])})
    rows = []
    for s in at_steps:
        k = int(np.searchsorted(steps, s))
        k = min(k, len(steps) - 1)
        r = pred.iloc[k]
        sd = float(r["K_std"])
        rows.append({
            "step": int(r["step"]),
            "t": float(r["t"]),
            "K_observed": float(r["K_observed"]),
            "K_mean (Thm 17)": float(r["K_mean"]),
            "K_sd (Thm 17)": sd,
            "z": (float(r["K_observed"]) - float(r["K_mean"])) / sd if sd > 0 else float("nan"),
            "rel_error": float(r["K_observed"]) / float(r["K_mean"]) - 1.0,
        })
        if "K_mean_discrete" in pred and math.isfinite(float(r["K_mean_discrete"])):
            rows[-1]["K_mean + step drift"] = float(r["K_mean_discrete"])
            rows[-1]["rel_error (with step drift)"] = float(r["K_observed"]) / float(r["K_mean_discrete"]) - 1.0
    return rows


def terms_summary(record) -> list[dict]:
    """Per-layer time averages of μ, κ, ‖λ‖² and the covariance share of κ."""
    from .plotting import layer_label, layer_names
    from .terms import term

    rows = []
    for name in layer_names(record) + ["network"]:
        def col(term):
            key = f"{term}_Z" if name == "network" else f"{term}/{name}"
            return record[key] if key in record else None

        row = {"layer": name if name == "network" else layer_label(record, name)}
        for t in (term("drift"), term("noise_curvature"), term("diffusion_sq")):
            row[f"mean {t.ascii}"] = float(col(t.column).mean())
        kappa = col("noise_curvature")
        if name != "network":
            cov = record.get(f"noise_curvature_cov/{name}")
            row["K first"] = float(record[f"K/{name}"].iloc[0])
            row["K last"] = float(record[f"K/{name}"].iloc[-1])
        else:
            cov = record.get("noise_curvature_cov_Z")
            row["K first"] = float(record["K"].iloc[0])
            row["K last"] = float(record["K"].iloc[-1])
        row["cov share of kappa"] = float(cov.sum() / kappa.sum()) if cov is not None and float(kappa.sum()) else float("nan")
        rows.append(row)
    return rows


def _simulate(record, lr: float, n: int, seed: int, device: str, progress: bool) -> dict:
    """Reduced Z-SDE (Thm 15) with the record's coefficients, n trajectories, as plot-ready arrays."""
    from .sde import simulate_record

    res = simulate_record(record, n=n, lr=lr, seed=seed, device=device, progress=progress)
    return {
        "t": res.t,
        "mean": res.mean_K,
        "var": res.var_K,
        "quantiles": dict(zip(res.quantile_levels, res.quantiles)),
        "label": f"SDE Monte Carlo (n={n})",
        "result": res,
    }


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------


def _train_config(args, record: Optional[str]):
    from .train import TrainConfig

    return TrainConfig(
        model=args.model, dataset=args.dataset, data_root=args.data_root, download=args.download, lr=args.lr,
        batch_size=args.batch_size, steps=args.steps, init=args.init, init_std=args.init_std,
        init_seed=args.init_seed, sampling_seed=args.sampling_seed, regularizer=args.regularizer,
        track=True, track_every=_schedule(args.track_every), engine=args.engine, split=not args.no_split,
        decomposition=args.decomposition, probe_every=args.probe_every, record=record,
        checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
        max_train_samples=args.max_train_samples, device=args.device, dtype=args.dtype,
        overwrite=getattr(args, "overwrite", False), threads=args.threads,
    )


THREADS_HELP = ("torch CPU threads (default: the cores idle when the run starts, at least 1; OMP_NUM_THREADS wins "
                "when set)")


def _threads(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads must be at least 1, got {value}")
    return n


def _schedule(value: str):
    return value if value == "log" else int(value)


def _track_flags() -> dict:
    """TrainConfig field → the ``sdelip track`` flag that sets it (from the parser itself)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--overwrite", action="store_true")
    _add_training_options(p)
    flags = {a.dest: max(a.option_strings, key=len) for a in p._actions if a.option_strings}
    flags["split"] = flags.pop("no_split")
    return flags


def cli_option(option: str, value) -> str:
    """A TrainConfig option as the ``sdelip track`` command line spells it, e.g. ``--lr 0.01``."""
    from .regularizers import PRESETS, RegularizerConfig

    flag = _track_flags().get(option)
    if flag is None:
        return f"{option}={value!r} (set from Python, no command-line flag)"
    if option == "split":
        return "without --no-split" if value else "--no-split"
    if option == "regularizer":  # a RegularizerConfig, or its str as the record metadata keeps it
        value = next((name for name, cfg in PRESETS.items() if cfg == value or str(cfg) == value),
                     ", ".join(value.active()) if isinstance(value, RegularizerConfig) else value)
    if isinstance(value, bool):
        return flag if value else f"without {flag}"
    if value is None:
        return f"without {flag}"
    return f"{flag} {value}"


def default_checkpoint(record) -> Path:
    """The checkpoint ``sdelip track`` keeps beside a record by default: ``<record>.ckpt``."""
    record = Path(record)
    return record.with_name(record.name + ".ckpt")


def cmd_track(args) -> int:
    from .train import ResumeError, train

    record = Path(args.record)
    if args.no_checkpoint:
        args.checkpoint = None
    elif args.checkpoint is None:
        args.checkpoint = str(default_checkpoint(record))
    try:
        result = train(_train_config(args, str(record)), progress=not args.no_progress)
    except ResumeError as exc:
        raise ResumeError(exc.problem, exc.changes, exc.source, spell=cli_option) from None
    print(f"data: {result.data} ({result.data_source})")
    resumed = f" (resumed at step {result.resumed_at})" if result.resumed_at is not None else ""
    print(f"{result.steps} steps{resumed}, {result.seconds:.1f} s in this process; final loss {result.final_loss:.4f}, "
          f"train accuracy {result.train_accuracy:.3f} over all steps"
          + (f", test accuracy {result.test_accuracy:.3f}" if result.test_accuracy is not None else ""))
    print(f"K: {result.K_initial:.4g} -> {result.K_final:.4g}; record: {record}")
    if result.checkpoints:
        print(f"checkpoint: {args.checkpoint} ({result.checkpoints} written, {result.checkpoint_seconds:.2f} s)")
    return 0


def cmd_predict(args) -> int:
    from .prediction import predict

    if args.csv:
        _check_output(args.csv)
    record = _load(args.record)
    _degenerate(record, args.include_degenerate, "the prediction")
    pred = predict(record, degenerate="include" if args.include_degenerate else "exclude")
    if args.csv:
        pred.to_csv(args.csv, index=False)
        print(f"prediction written to {args.csv}")
    _print_table(prediction_summary(record, pred))
    return 0


def cmd_simulate(args) -> int:
    import numpy as np

    if args.csv:
        _check_output(args.csv)
    record = _load(args.record)
    lr = _lr_of(args.record, record)
    record = _degenerate(record, args.include_degenerate, "the simulation")
    from .threads import use_threads

    with use_threads(args.threads):
        sim = _simulate(record, lr, args.n, args.seed, args.device, not args.no_progress)
    rows = []
    t = np.asarray(sim["t"])
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        k = int(round(q * (len(t) - 1)))
        row = {"t": float(t[k]), "E[K] (MC)": float(sim["mean"][k]), "sd[K] (MC)": float(np.sqrt(sim["var"][k]))}
        for qq, arr in sorted(sim["quantiles"].items()):
            row[f"q{qq:g}"] = float(arr[k])
        rows.append(row)
    _print_table(rows)
    if args.csv:
        import pandas as pd

        df = pd.DataFrame({"t": t, "mean_K": sim["mean"], "var_K": sim["var"],
                           **{f"q{q:g}": v for q, v in sorted(sim["quantiles"].items())}})
        df.to_csv(args.csv, index=False)
        print(f"simulation summary written to {args.csv}")
    return 0


def cmd_plot(args) -> int:
    from .plotting import save_figure, summary_figure
    from .prediction import predict

    out = _check_output(args.out or Path(args.record).with_suffix(".png"))
    record = _load(args.record)
    used = _degenerate(record, args.include_degenerate, "the prediction and the simulation")
    pred = predict(record, degenerate="include" if args.include_degenerate else "exclude")
    sim = None
    if args.simulate:
        sim = _simulate(used, _lr_of(args.record, record), args.simulate, 0, "cpu", False)
    save_figure(summary_figure(record, pred, simulation=sim, title=str(args.record), smooth=args.smooth), out)
    print(f"figure written to {out}")
    return 0


def cmd_info(args) -> int:
    record = _load(args.record, need_rows=False)
    meta = _metadata(args.record)
    if args.json:
        print(json.dumps({"metadata": meta, "rows": len(record)}, indent=2, default=str))
        return 0
    print(f"record: {args.record}")
    for key in ("model", "engine", "lr", "batch_size", "data", "data_source", "regularizers", "seed",
                "init_seed", "sampling_seed", "versions"):
        if key in meta:
            print(f"  {key}: {meta[key]}")
    layers = meta.get("layers")
    if layers:
        print("  layers:")
        for layer in layers:
            print(f"    {layer}")
    left = meta.get("left_out")
    if left:
        by_reason: dict = {}
        for o in left:
            by_reason.setdefault(o["reason"], []).append(o["name"])
        print(f"  left out ({len(left)} parameters, not tracked):")
        for reason, names in by_reason.items():
            shown = ", ".join(names[:8]) + (f", … {len(names) - 8} more" if len(names) > 8 else "")
            print(f"    {reason}: {shown}")
    steps = record["step"]
    if record.empty:
        print("  rows: 0 (no step recorded yet)")
        return 0
    print(f"  rows: {len(record)} (steps {int(steps.iloc[0])}..{int(steps.iloc[-1])})")
    from .prediction import degenerate_steps

    bad = degenerate_steps(record)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (", …" if len(bad) > 8 else "")
        print(f"  degenerate steps: {len(bad)} ({shown}): a layer's top singular value repeated (Assumption 11), "
              "their terms are undefined by the theory")
        if not args.include_degenerate:
            if len(bad) == len(record):
                print("  every step is degenerate: no averages (--include-degenerate shows them)")
                return 0
            print("  the averages below leave them out (--include-degenerate includes them)")
            record = record[~record["step"].isin(bad)].reset_index(drop=True)
    print()
    _print_table(terms_summary(record))
    return 0


def cmd_copy(args) -> int:
    from .record import copy_record

    out = copy_record(args.record, args.dest)
    print(f"record copied to {out} (one self-contained file)")
    return 0


def cmd_demo(args) -> int:
    from .plotting import save_figure, summary_figure
    from .prediction import predict
    from .train import TrainConfig, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "record.db"
    if record_path.exists():
        record_path.unlink()
    t0 = time.perf_counter()
    print(f"[1/3] training the paper's MLP (784-512-256-10) with live tracking: {args.steps} SGD steps, "
          f"lr {args.lr}, batch {args.batch_size}")
    config = TrainConfig(model="mlp", dataset="mnist", data_root=args.data_root, lr=args.lr,
                         batch_size=args.batch_size, steps=args.steps, init_seed=args.seed,
                         sampling_seed=args.seed, record=str(record_path), track=True, threads=args.threads)
    result = train(config, progress=not args.no_progress)
    record = _load(record_path)
    pred = predict(record)
    print(f"[2/3] simulating {args.trajectories} trajectories of the reduced SDE (Thm 15) from the record")
    sim = _simulate(_degenerate(record, False, "the simulation"), args.lr, args.trajectories, args.seed, "cpu",
                    not args.no_progress)
    print("[3/3] writing the figure and the tables")
    fig_path = save_figure(
        summary_figure(record, pred, simulation=sim,
                       title=f"MLP on {result.data}: {args.steps} steps, lr {args.lr}, M {args.batch_size}",
                       smooth=max(1, args.steps // 50)),
        out / "demo.png")
    pred_rows = prediction_summary(record, pred)
    terms_rows = terms_summary(record)
    import numpy as np

    t_sim = np.asarray(sim["t"])
    last = len(t_sim) - 1
    lo, hi = min(sim["quantiles"]), max(sim["quantiles"])
    K_obs = float(record["K"].iloc[-1])
    summary = [
        "# sdelip demo",
        "",
        f"Data: {result.data_source}. Model: MLP 784-512-256-10, plain SGD (lr {args.lr}, M {args.batch_size}), "
        f"{args.steps} steps, every step tracked ({time.perf_counter() - t0:.0f} s in all).",
        f"Training loss {result.final_loss:.3f}, train accuracy {result.train_accuracy:.3f}"
        + (f", test accuracy {result.test_accuracy:.3f}." if result.test_accuracy is not None else "."),
        "",
        "## Observed K(t) against the Thm 16–17 prediction",
        "",
        _markdown_table(pred_rows),
        "K_mean + step drift adds the O(η) drift (η/2σ1)∇LᵀH∇L of a discrete SGD step, which the SDE drops "
        "(recorded per step as step_curvature; not part of the paper's Thm 14–17).",
        "",
        f"SDE Monte Carlo ({args.trajectories} trajectories): E[K(T)] = {float(sim['mean'][last]):.4g}, "
        f"{lo:.1%}–{hi:.1%} band [{float(sim['quantiles'][lo][last]):.4g}, {float(sim['quantiles'][hi][last]):.4g}]; "
        f"observed K(T) = {K_obs:.4g}.",
        "",
        "## Dynamics terms (time averages over the run)",
        "",
        _markdown_table(terms_rows),
        "![demo](demo.png)",
    ]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print()
    _print_table(pred_rows)
    print()
    _print_table(terms_rows)
    print(f"\nfigure: {fig_path}\ntables: {out / 'summary.md'}\nrecord: {record_path}")
    return 0


# ---------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="mlp", choices=["mlp", "convnet"], help="Table 2 MLP or Table 1 ConvNet")
    g.add_argument("--dataset", default="mnist",
                   choices=["mnist", "mnist-embedded", "cifar10", "cifar100", "cifar-standin"],
                   help="mnist falls back to the 5,000 bundled digits when no files are found")
    g.add_argument("--data-root", default=None, help="torchvision data folder (default $SDELIP_DATA or ./data)")
    g.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    g.add_argument("--max-train-samples", type=int, default=None, help="use only the first N training samples")
    g.add_argument("--init", default="default", choices=["default", "kaiming", "normal"], help="Sec 8.2 scheme")
    g.add_argument("--init-std", type=float, default=None, help="std for --init normal")
    s = p.add_argument_group("SGD")
    s.add_argument("--lr", type=float, default=0.01, help="learning rate η (the SDE time step)")
    s.add_argument("--batch-size", type=int, default=128, help="mini-batch size M (≥ 2)")
    s.add_argument("--steps", type=int, default=300, help="number of SGD steps")
    s.add_argument("--init-seed", type=int, default=0, help="parameter-initialisation seed")
    s.add_argument("--sampling-seed", type=int, default=0, help="mini-batch sampling seed (Sec 8.7)")
    s.add_argument("--regularizer", default="none",
                   choices=["none", "batchnorm", "dropout", "weight_decay", "mixup", "label_smoothing",
                            "autoaugment", "fgsm"], help="a Table 3 configuration")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    s.add_argument("--threads", type=_threads, default=None, help=THREADS_HELP)
    t = p.add_argument_group("tracking")
    t.add_argument("--track-every", default="1", help="track every N steps, or 'log' (logarithmic schedule)")
    t.add_argument("--engine", default="auto", choices=["auto", "factored", "materialised", "coupled"],
                   help="per-sample statistics engine")
    t.add_argument("--no-split", action="store_true", help="skip the Prop 6 variance/covariance split of κ")
    t.add_argument("--decomposition", default="fast", choices=["fast", "svd", "gram"],
                   help="how σ1 and the Hessian terms are computed (fast: Gram resolvent; svd: thin SVD)")
    t.add_argument("--probe-every", type=int, default=None,
                   help="every N steps also record exact conv norms and an empirical Lipschitz lower bound")
    t.add_argument("--checkpoint", default=None,
                   help="checkpoint file (default: RECORD.ckpt beside the record); an existing one is resumed, with "
                        "the same options as the run that wrote it, so rerunning a killed command continues it")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="write the checkpoint every N steps (default: automatically, as often as keeps the time "
                        "spent on checkpoints under 2.5%% of the run)")


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
    d.add_argument("--trajectories", type=int, default=10000, help="SDE trajectories (default 10,000)")
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
    pr.set_defaults(func=cmd_predict)

    si = sub.add_parser("simulate", help="Monte Carlo of the reduced Z-SDE with a record's coefficients")
    si.add_argument("record")
    si.add_argument("-n", "--n", type=int, default=10000, help="number of trajectories")
    si.add_argument("--seed", type=int, default=0)
    si.add_argument("--device", default="cpu")
    si.add_argument("--csv", default=None, help="write mean, variance and quantiles over time here")
    si.add_argument("--no-progress", action="store_true")
    si.add_argument("--threads", type=_threads, default=None, help=THREADS_HELP)
    si.add_argument("--include-degenerate", action="store_true",
                    help="use the terms of degenerate steps (repeated top singular value) in the simulation")
    si.set_defaults(func=cmd_simulate)

    pl = sub.add_parser("plot", help="figure from a record (prediction, terms, κ split)")
    pl.add_argument("record")
    pl.add_argument("--out", default=None, help="PNG path (default: next to the record)")
    pl.add_argument("--simulate", type=int, default=0, metavar="N", help="add an SDE band from N trajectories")
    pl.add_argument("--smooth", type=int, default=1, help="moving-average window for the terms")
    pl.add_argument("--include-degenerate", action="store_true",
                    help="use the terms of degenerate steps (repeated top singular value) in the prediction and the simulation")
    pl.set_defaults(func=cmd_plot)

    inf = sub.add_parser("info", help="a record's metadata and a summary of its terms")
    inf.add_argument("record")
    inf.add_argument("--json", action="store_true", help="metadata as JSON")
    inf.add_argument("--include-degenerate", action="store_true",
                    help="use the terms of degenerate steps (repeated top singular value) in the averages")
    inf.set_defaults(func=cmd_info)

    cp = sub.add_parser("copy", help="copy a record, also one still being written, into one self-contained file",
                        description="Copy a record with SQLite's online backup API: a consistent snapshot of its "
                                    "committed steps (those still in its -wal file included) as one file. Safe while "
                                    "the run is writing; the source is only read.")
    cp.add_argument("record")
    cp.add_argument("dest", help="the copy (must not exist)")
    cp.set_defaults(func=cmd_copy)
    return p


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _one_line_warnings()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
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
