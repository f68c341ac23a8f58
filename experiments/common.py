"""Shared plumbing of the experiment scripts: scales, output folders, tables.

Every script in ``experiments/`` has a ``--quick`` scale (default; minutes on a 2-core
CPU with the bundled data) and a ``--paper`` scale (the paper's settings, for a GPU and
the real datasets), writes its records, PNG figures and a summary table (CSV and
Markdown) into ``--out`` (default ``experiments/out/<name>``), and states which data
it used in the table and in ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

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


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def write_table(rows: Sequence[Mapping], out: Path, stem: str = "summary", title: Optional[str] = None,
                notes: Iterable[str] = ()) -> tuple[Path, Path]:
    """Write rows as ``<stem>.csv`` and ``<stem>.md`` (a Markdown table plus notes)."""
    out = Path(out)
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    csv_path = out / f"{stem}.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    md = []
    if title:
        md += [f"## {title}", ""]
    md.append("| " + " | ".join(cols) + " |")
    md.append("|" + "---|" * len(cols))
    for r in rows:
        md.append("| " + " | ".join(_fmt(r.get(k, "")) for k in cols) + " |")
    notes = list(notes)
    if notes:
        md.append("")
        md += [f"- {n}" for n in notes]
    md_path = out / f"{stem}.md"
    md_path.write_text("\n".join(md) + "\n")
    return csv_path, md_path


def write_json(obj, path: Path) -> Path:
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
    return Path(path)


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import numpy as np

    def ranks(a):
        a = np.asarray(a, dtype=float)
        order = a.argsort(kind="mergesort")
        r = np.empty_like(a)
        r[order] = np.arange(len(a), dtype=float)
        for v in np.unique(a):  # average ties
            m = a == v
            r[m] = r[m].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares y ≈ a + b x with R²."""
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    A = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    pred = A @ coef
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"intercept": float(coef[0]), "slope": float(coef[1]), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


def single_thread(args) -> None:
    """Use one CPU thread at tiny/quick scale unless OMP_NUM_THREADS says otherwise.

    On a small shared CPU, multithreaded LAPACK under contention made one float64 SVD of
    a 512×784 matrix take seconds instead of 0.07 s; one thread avoids that.
    """
    import os

    import torch

    if args.scale != "paper" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
