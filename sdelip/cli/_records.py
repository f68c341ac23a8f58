"""Commands that read a record: ``predict``, ``simulate``, ``plot``, ``info``, ``export``, ``copy``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from ._output import _check_output, _print_table


def _load(record_path, need_rows: bool = True, intact_only: bool = False):
    from ..record import load_record

    path = Path(record_path)
    if not path.exists():
        raise FileNotFoundError(f"no record at {path}: create one with `sdelip track --record {path}`")
    record = load_record(path, intact_only=intact_only)
    if need_rows and record.empty:
        raise ValueError(f"the record {str(path)!r} holds no steps yet (0 rows): nothing to predict, simulate or plot")
    return record


def _degenerate(record, include: bool, what: str):
    """Report the record's degenerate steps and return the record ``what`` uses (module prediction)."""
    from ..analysis.prediction import degenerate_steps, drop_degenerate

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


def _diverged(record, include: bool, what: str, path):
    """Report the steps where the run diverged and return the record ``what`` uses (the steps before them).

    Raises:
        ValueError: the run diverged at its first step (nothing left to use).
    """
    from ..record.integrity import DIVERGENCE_FACTOR, diverged_steps

    bad = diverged_steps(record)
    if not bad:
        return record
    first = bad[0]
    K = record.loc[record["step"] == first, "K"].iloc[0]
    head = (f"the run diverged at step {first} (K = {K:.4g}; K or the loss non-finite or at least {DIVERGENCE_FACTOR:g} "
            f"times the first step's): {len(bad)} of {len(record)} steps are flagged")
    if include:
        print(f"sdelip: notice: {head}; they are used for {what} as recorded (--include-diverged)", file=sys.stderr)
        return record
    kept = record[record["step"] < first].reset_index(drop=True)
    if kept.empty:
        raise ValueError(f"the record {str(path)!r}: {head}, from its first step on: nothing to use for {what} "
                         "(--include-diverged uses the diverged steps)")
    print(f"sdelip: notice: {head}; only the {len(kept)} step(s) before step {first} are used for {what} "
          "(--include-diverged uses them all)", file=sys.stderr)
    kept.attrs = dict(record.attrs)
    return kept


def _check_finite(rows, path, what: str) -> None:
    """Refuse to print a table with infinite or NaN numbers as if it were a result."""
    bad = sorted({k for r in rows for k, v in r.items()
                  if isinstance(v, float) and not math.isfinite(v) and k not in ("z", "rel_error")})
    if bad:
        raise ValueError(f"{what} of the record {str(path)!r} overflows or is undefined ({', '.join(bad)} not finite): "
                         "its coefficients are too large for the formulas (a diverging run?); nothing is reported")


def _metadata(record_path) -> dict:
    from ..record import load_metadata

    return load_metadata(Path(record_path))


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
    from ..analysis.plotting import layer_label, layer_names
    from ..core.catalogue import LOG_K_COEFFICIENTS, layer_column, network_column, term

    rows = []
    for name in layer_names(record) + ["network"]:
        def col(term_name):
            key = network_column(term_name) if name == "network" else layer_column(term_name, name)
            return record[key] if key in record else None

        row = {"layer": name if name == "network" else layer_label(record, name)}
        for t in map(term, LOG_K_COEFFICIENTS):
            row[f"mean {t.ascii}"] = float(col(t.name).mean())
        kappa, cov, K = col("noise_curvature"), col("noise_curvature_cov"), col("sigma1")
        row["K first"] = float(K.iloc[0])
        row["K last"] = float(K.iloc[-1])
        row["cov share of kappa"] = float(cov.sum() / kappa.sum()) if cov is not None and float(kappa.sum()) else float("nan")
        rows.append(row)
    return rows


def _simulate(record, lr: Optional[float], n: int, seed: int, device: str, progress: bool, flag: str = "--lr") -> dict:
    """Reduced Z-SDE (Thm 15) with the record's coefficients, n trajectories, as plot-ready arrays.

    On the record's own η(t) when ``lr`` is None (a schedule: each step over its own Δt); one
    ``lr`` for a record whose learning rate varies is refused as in Python
    (:class:`~sdelip.errors.LearningRateScheduleError`, naming ``flag``).
    """
    from ..sde import simulate_record
    from ..sde.reduced import record_step_sizes, schedule_refusal

    if lr is not None:
        sizes = record_step_sizes(record)
        if sizes is not None:
            raise schedule_refusal(record, sizes, flag)
    res = simulate_record(record, n=n, lr=lr, seed=seed, device=device, progress=progress)
    return {
        "t": res.t,
        "mean": res.mean_K,
        "var": res.var_K,
        "quantiles": dict(zip(res.quantile_levels, res.quantiles)),
        "label": f"SDE Monte Carlo (n={n})",
        "result": res,
    }


def cmd_predict(args) -> int:
    from ..analysis.prediction import predict

    import numpy as np

    if args.csv:
        _check_output(args.csv)
    record = _load(args.record, intact_only=args.intact_only)
    record = _diverged(record, args.include_diverged, "the prediction", args.record)
    _degenerate(record, args.include_degenerate, "the prediction")
    with np.errstate(over="ignore", invalid="ignore"):
        pred = predict(record, degenerate="include" if args.include_degenerate else "exclude")
        rows = prediction_summary(record, pred)
    _check_finite(rows, args.record, "the prediction")
    if args.csv:
        pred.to_csv(args.csv, index=False)
        print(f"prediction written to {args.csv}")
    _print_table(rows)
    return 0


def cmd_simulate(args) -> int:
    import numpy as np

    if args.csv:
        _check_output(args.csv)
    record = _load(args.record, intact_only=args.intact_only)
    record = _diverged(record, args.include_diverged, "the simulation", args.record)
    record = _degenerate(record, args.include_degenerate, "the simulation")
    from ..tracking.threads import use_threads

    with use_threads(args.threads):
        sim = _simulate(record, args.lr, args.trajectories, args.seed, args.device, not args.no_progress)
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
    from ..analysis.plotting import run_title, save_figure, summary_figure
    from ..analysis.prediction import predict

    out = _check_output(args.out or Path(args.record).with_suffix(".png"))
    record = _load(args.record, intact_only=args.intact_only)
    record = _diverged(record, args.include_diverged, "the prediction and the simulation", args.record)
    used = _degenerate(record, args.include_degenerate, "the prediction and the simulation")
    pred = predict(record, degenerate="include" if args.include_degenerate else "exclude")
    sim = None
    if args.simulate:
        n = args.simulate if args.simulate > 0 else args.trajectories
        sim = _simulate(used, None, n, args.seed, "cpu", not args.no_progress)
    meta = _metadata(args.record)
    title = args.title or run_title(meta, record)
    save_figure(summary_figure(record, pred, simulation=sim, title=title, smooth=args.smooth, metadata=meta), out)
    print(f"figure written to {out}")
    return 0


def cmd_info(args) -> int:
    record = _load(args.record, need_rows=False, intact_only=args.intact_only)
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
    from ..analysis.prediction import degenerate_steps

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
    record = _diverged(record, args.include_diverged, "the averages", args.record)
    if "update_modelled" in record.columns and not record["update_modelled"].all():
        off = record.loc[~record["update_modelled"].astype(bool)]
        notes = [n for n in off.get("update_note", []) if isinstance(n, str)]
        shown = ", ".join(map(str, off["step"].astype(int).tolist()[:8])) + (", …" if len(off) > 8 else "")
        print(f"  steps not modelled: {len(off)} ({shown}): {notes[0] if notes else 'see update_note'}; their "
              "coefficients do not describe the update (the realised_* columns do)")
        record = record[record["update_modelled"].astype(bool)].reset_index(drop=True)
        if record.empty:
            print("  no modelled step: no averages of the model's coefficients")
            return 0
        print("  the averages below leave them out")
    print()
    rows = terms_summary(record)
    _check_finite(rows, args.record, "the averages of the terms")
    _print_table(rows)
    return 0


def cmd_copy(args) -> int:
    from ..record import copy_record

    out = copy_record(args.record, args.dest)
    print(f"record copied to {out} (one self-contained file)")
    return 0



def cmd_export(args) -> int:
    from ..loggers import export_record

    _load(args.record, need_rows=False)
    dest = export_record(args.record, args.to, args.out, project=args.project)
    print(f"record exported to {args.to}: {dest}")
    return 0
