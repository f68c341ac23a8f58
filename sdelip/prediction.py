"""From a record to the Thm 16–17 prediction of K(t), side by side with the observed K(t).

Given the network coefficients measured along a run — μ_Z, κ_Z, λ_Z² (Thm 15) at the
tracked steps k_0 < k_1 < … with SDE times t_0 < t_1 < … — the prediction is

- the deterministic path of Thm 16 (Eq. 17): Z_path(t_j) = Z(t_0) + Σ_{i<j} (μ_Z + κ_Z − ½ λ_Z²)(t_i) Δt_i,
  K_path = exp(Z_path);
- the Thm 17 moments: Z_mean = Z_path, Z_std² = Var[Z] = Σ_{i<j} λ_Z²(t_i) Δt_i (Eq. 18),
  K_mean = E[K] = K(t_0) exp Σ_{i<j} (μ_Z + κ_Z)(t_i) Δt_i (Eq. 15),
  K_std² = Var[K] = E[K]² (e^{Var Z} − 1) (Eq. 16),

with Δt_i = t_{i+1} − t_i. The coefficients measured at a tracked step are held constant
until the next tracked step (left Riemann sums, THEORY.md §1): for a record of every step
Δt_i = η and the sums are the ∫ … ds of Thm 16–17 on the step grid; for a sparse schedule
(every N steps, logarithmic) the same rule integrates over the actual spacing, which is
exact only if the coefficients change little between tracked steps.

Thm 17 is exact when the coefficients are deterministic functions of time; measured along
one run they are one realisation, so the moments describe runs whose coefficients follow
this one's.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import pandas as pd

from .dynamics import lipschitz_moments
from .record import load_record

__all__ = ["predict", "PREDICTION_COLUMNS"]

#: Columns of :func:`predict`'s DataFrame.
PREDICTION_COLUMNS = (
    "step",
    "t",
    "K_observed",
    "Z_observed",
    "Z_path",
    "K_path",
    "K_mean",
    "K_std",
    "Z_mean",
    "Z_std",
)


def predict(record: Union[str, os.PathLike, pd.DataFrame], start_step: Optional[int] = None) -> pd.DataFrame:
    """The Thm 16 path and the Thm 17 mean and spread of K(t) from a record.

    Args:
        record: a record path or the DataFrame of :func:`sdelip.record.load_record` (needs
            the columns step, t, Z, K, drift_Z, noise_curvature_Z, diffusion_sq_Z).
        start_step: start the prediction at this tracked step (default: the first row);
            Z(0) and K(0) are the observed values there.

    Returns:
        DataFrame with one row per tracked step from the start: step, t, K_observed,
        Z_observed, Z_path, K_path, K_mean, K_std, Z_mean, Z_std, and, when the record has
        ``step_curvature_Z``, K_mean_discrete: the Thm 17 mean with the O(η) drift of the
        discrete step, (η/2σ1)∇LᵀH∇L per layer, added (not in the paper; THEORY.md §4).

    Raises:
        ValueError: missing columns, no rows, non-increasing times, non-finite coefficients.
    """
    df = load_record(record) if not isinstance(record, pd.DataFrame) else record
    need = ["step", "t", "Z", "K", "drift_Z", "noise_curvature_Z", "diffusion_sq_Z"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"the record lacks the column(s) {missing} needed for the prediction")
    df = df.sort_values("step")
    if start_step is not None:
        df = df[df["step"] >= int(start_step)]
    if len(df) == 0:
        raise ValueError("the record has no tracked step to predict from" +
                         (f" at or after step {start_step}" if start_step is not None else ""))
    t = df["t"].to_numpy(dtype=np.float64)
    dt = np.diff(t)
    if np.any(dt <= 0):
        bad = df["step"].to_numpy()[1:][dt <= 0][:5].tolist()
        raise ValueError(f"the SDE time t must increase along the record; it does not at steps {bad}")
    K0 = float(df["K"].iloc[0])
    mu = df["drift_Z"].to_numpy(dtype=np.float64)[:-1]
    kappa = df["noise_curvature_Z"].to_numpy(dtype=np.float64)[:-1]
    lam2 = df["diffusion_sq_Z"].to_numpy(dtype=np.float64)[:-1]
    # Each coefficient holds for its own Δt_i: integrate with dt = 1 over f_i·Δt_i (left sums).
    mom = lipschitz_moments(K0, mu * dt, kappa * dt, lam2 * dt, dt=1.0)
    out = pd.DataFrame(
        {
            "step": df["step"].to_numpy(dtype=np.int64),
            "t": t,
            "K_observed": df["K"].to_numpy(dtype=np.float64),
            "Z_observed": df["Z"].to_numpy(dtype=np.float64),
            "Z_path": mom.mean_Z,
            "K_path": np.exp(mom.mean_Z),
            "K_mean": mom.mean_K,
            "K_std": mom.std_K,
            "Z_mean": mom.mean_Z,
            "Z_std": np.sqrt(mom.var_Z),
        }
    )
    if "step_curvature_Z" in df.columns:
        # Beyond Thm 17: the mean with the O(η) drift of the discrete step added (THEORY.md §4),
        # E[K] ≈ K0 exp ∫(μ_Z + κ_Z + step_curvature_Z). NaN where a record predates the column.
        sc = df["step_curvature_Z"].to_numpy(dtype=np.float64)[:-1]
        out["K_mean_discrete"] = mom.mean_K * np.exp(np.concatenate([[0.0], np.cumsum(sc * dt)]))
    return out
