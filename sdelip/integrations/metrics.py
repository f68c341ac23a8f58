"""What the framework integrations share, without importing any framework: the terms as logger metrics."""

from __future__ import annotations

import math

__all__ = ["step_metrics"]

_NETWORK = ("t", "lr", "loss", "K", "Z", "drift_Z", "noise_curvature_Z", "diffusion_sq_Z", "step_curvature_Z",
            "noise_curvature_var_Z", "noise_curvature_cov_Z", "degenerate", "update_modelled")


def step_metrics(rec, which: str = "network", prefix: str = "sdelip/") -> dict[str, float]:
    """A :class:`~sdelip.record.StepRecord` as the ``{name: float}`` a logger's ``log_metrics`` takes.

    ``which="network"``: the network terms; ``"all"``: every numeric column. Booleans are
    0/1, missing values (NaN) are left out.
    """
    row = rec.as_row()
    keys = [k for k in row if k != "step"] if which == "all" else [k for k in _NETWORK if k in row]
    out = {}
    for k in keys:
        v = row[k]
        if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out[prefix + k] = float(v)
    return out


