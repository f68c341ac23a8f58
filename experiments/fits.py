"""Small statistics of the experiment scripts: rank correlation and least-squares line."""

from __future__ import annotations

from typing import Sequence

__all__ = ["spearman", "linear_fit"]


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
