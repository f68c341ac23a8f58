"""From a record to the Thm 16–17 prediction of K(t), side by side with the observed K(t).

Given the network coefficients measured along a run — μ_Z, κ_Z, λ_Z² (Thm 15) at the
tracked steps k_0 < k_1 < … with SDE times t_0 < t_1 < … — the prediction is

- the deterministic path of Thm 16 (Eq. 17): Z_path(t_j) = Z(t_0) + Σ_{i<j} (μ_Z + κ_Z − ½ λ_Z²)(t_i) Δt_i,
  K_path = exp(Z_path);
- the Thm 17 moments: Z_mean = Z_path, Z_std² = Var[Z] = Σ_{i<j} λ_Z²(t_i) Δt_i (Eq. 18),
  K_mean = E[K] = K(t_0) exp Σ_{i<j} (μ_Z + κ_Z)(t_i) Δt_i (Eq. 15),
  K_std² = Var[K] = E[K]² (e^{Var Z} − 1) (Eq. 16),

with Δt_i = t_{i+1} − t_i. The coefficients measured at a tracked step are held constant
until the next tracked step (left Riemann sums, docs/theory.md §1): for a record of every step
Δt_i = η and the sums are the ∫ … ds of Thm 16–17 on the step grid; for a sparse schedule
(every N steps, logarithmic) the same rule integrates over the actual spacing, which is
exact only if the coefficients change little between tracked steps.

Thm 17 is exact when the coefficients are deterministic functions of time; measured along
one run they are one realisation, so the moments describe runs whose coefficients follow
this one's.

Degenerate steps. A step is flagged ``degenerate`` when a layer's top singular value was
(nearly) repeated, relative gap below ``gap_tol`` (Assumption 11 violated, e.g. an
orthogonal initialisation). There σ1 is not differentiable and the Lemma 12–13 terms
carry 1/(σ1² − σ2²): κ and the Hessian terms of such a step are not defined by the
theory and their numbers (clamped gaps) can be orders of magnitude off. By default
(:func:`drop_degenerate`) they never drive a prediction or a simulation: leading
degenerate rows are dropped (the prediction starts at the first regular step, from the K
observed there) and the coefficients of a later degenerate step are replaced by those of
the previous regular step, exactly as a sparse schedule holds a tracked step's
coefficients until the next one. ``degenerate="include"`` uses them as recorded.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import pandas as pd

from ..errors import UnmodelledUpdateError  # noqa: F401  (defined there, re-exported)

from ..core.formulas import lipschitz_moments
from ..record import load_record
from ..core.catalogue import COEFFICIENT_COLUMNS, LOG_K_COEFFICIENTS, layer_column, network_column

__all__ = ["predict", "drop_degenerate", "degenerate_steps", "check_modelled", "UnmodelledUpdateError",
           "PREDICTION_COLUMNS"]




def check_modelled(df: pd.DataFrame, what: str = "the prediction") -> None:
    """Refuse a record with steps whose update is not modelled (``update_modelled`` False).

    Such a step was taken by an optimizer without an update rule, with a gradient edited
    between ``tracker.backward`` and ``optimizer.step()`` in a way the rule cannot follow, or
    not taken at all; its coefficients are NaN or describe another update (docs/tracking.md,
    "Optimizers"). The record's ``realised_*`` columns still hold what each update did.

    Raises:
        UnmodelledUpdateError: naming the first such steps and the recorded cause.
    """
    if "update_modelled" not in df.columns:
        return
    bad = df.loc[~df["update_modelled"].astype(bool)]
    if len(bad) == 0:
        return
    steps = bad["step"].astype(int).tolist()
    notes = [n for n in (bad["update_note"] if "update_note" in bad.columns else []) if isinstance(n, str)]
    cause = notes[0] if notes else ("the record was written by sdelip 0.1 with the plain-SGD formulas for an "
                                    "optimizer that is not plain SGD (momentum, Adam, …)")
    raise UnmodelledUpdateError(
        f"{what} needs the model coefficients of every step, but {len(steps)} step(s) of the record are not "
        f"modelled (steps {steps[:8]}{' …' if len(steps) > 8 else ''}): {cause}. The realised increments "
        "(realised_drift/<layer>, realised_curvature/<layer>) are recorded for every update; select the modelled "
        "rows (df[df.update_modelled]) to predict a stretch of the run that is"
    )

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
    "degenerate",
)


def degenerate_steps(df: pd.DataFrame) -> list[int]:
    """The steps of a record flagged degenerate (a layer's σ1 (nearly) repeated, Assumption 11)."""
    if "degenerate" not in df.columns or df.empty:
        return []
    flag = df["degenerate"].fillna(False).astype(bool).to_numpy()
    return [int(s) for s in df["step"].to_numpy()[flag]]


def _is_coefficient(col: str) -> bool:
    return col.split("/", 1)[0] in COEFFICIENT_COLUMNS


def drop_degenerate(df: pd.DataFrame) -> pd.DataFrame:
    """The record with its degenerate steps kept out of the coefficients (module docstring).

    Leading degenerate rows are dropped; a later degenerate row keeps its observed K and Z
    but takes the Thm 14–15 coefficients (drift, noise curvature and its split, diffusion,
    step curvature; network and per layer) of the previous regular row.

    Raises:
        ValueError: every step is degenerate.
    """
    bad = set(degenerate_steps(df))
    if not bad:
        return df
    df = df.sort_values("step").reset_index(drop=True)
    flag = df["step"].isin(bad).to_numpy()
    if flag.all():
        raise ValueError(f"every step of the record ({len(df)}) is degenerate (a layer's top singular value "
                         "repeated, Assumption 11): its coefficients are undefined; pass degenerate='include' "
                         "(--include-degenerate) to use them anyway")
    first = int(np.argmin(flag))
    df = df.iloc[first:].reset_index(drop=True)
    flag = flag[first:]
    cols = [c for c in df.columns if _is_coefficient(c)]
    if flag.any():
        df = df.copy()
        block = df[cols].mask(pd.Series(flag, index=df.index), np.nan)
        # forward fill from the previous regular row only (NaNs recorded on regular rows stay NaN)
        group = np.cumsum(~flag)
        df[cols] = block.groupby(group).transform("first")
    return df


def _step_product_mean(df: pd.DataFrame, K0: float, dt: np.ndarray) -> Optional[np.ndarray]:
    """E[K] of the discrete steps: K0 Π_steps Π_layers E[σ1'/σ1]^c (docs/theory.md §15), or None.

    One step changes a layer's σ1 by Δσ1/σ1 = u1ᵀΔv1/σ1 + ½Q(Δ)/σ1 to second order, whose
    mean is a = (μ + κ + step curvature)·Δt; a weight applied c times contributes
    E[(1 + x)^c] = (1 + a)^c + ½c(c − 1)‖λ‖²Δt. With independent layers (Assumption 3) the
    means multiply. Unlike ``K_mean_discrete`` (exp ∫(μ_Z + κ_Z + step_curvature_Z)), the
    product keeps the O(Δt²) terms a² of large steps: an adaptive method's first steps move σ1
    by several per cent. None for a record without the per-layer columns.
    """
    prefix = layer_column("drift", "")
    layers = [c[len(prefix):] for c in df.columns if c.startswith(prefix)]
    names = ("drift", "noise_curvature", "step_curvature", "diffusion_sq")
    if not layers or any(layer_column(q, l) not in df.columns for l in layers for q in names):
        return None
    log_growth = np.zeros(len(dt))
    for l in layers:
        c = int(df[f"uses/{l}"].iloc[0]) if f"uses/{l}" in df.columns else 1
        mu, kappa, step, lam2 = (df[layer_column(q, l)].to_numpy(np.float64)[:-1] * dt for q in names)
        log_growth += np.log((1.0 + mu + kappa + step) ** c + 0.5 * c * (c - 1) * lam2)
    return K0 * np.exp(np.concatenate([[0.0], np.cumsum(log_growth)]))


def predict(record: Union[str, os.PathLike, pd.DataFrame], start_step: Optional[int] = None,
            degenerate: str = "exclude") -> pd.DataFrame:
    """The Thm 16 path and the Thm 17 mean and spread of K(t) from a record.

    Args:
        record: a record path or the DataFrame of :func:`sdelip.record.load_record` (needs
            the columns step, t, Z, K, drift_Z, noise_curvature_Z, diffusion_sq_Z).
        start_step: start the prediction at this tracked step (default: the first row);
            Z(0) and K(0) are the observed values there.
        degenerate: ``"exclude"`` (default): degenerate steps never drive the prediction
            (:func:`drop_degenerate`); ``"include"``: use their coefficients as recorded.
            The output's ``degenerate`` column flags them and ``out.attrs["degenerate_steps"]``
            lists every flagged step of the record.

    Returns:
        DataFrame with one row per tracked step from the start: step, t, K_observed,
        Z_observed, Z_path, K_path, K_mean, K_std, Z_mean, Z_std, degenerate (the step is
        flagged; its coefficients were held from the previous step unless included), and, when the record has
        ``step_curvature_Z``, K_mean_discrete: the Thm 17 mean with the O(η) drift of the
        discrete step, (η/2σ1)∇LᵀH∇L per layer, added (not in the paper; docs/theory.md §6),
        and, with the per-layer columns, K_mean_steps: the product of the layers' one-step
        means (:func:`_step_product_mean`, docs/theory.md §15), which keeps the a² of large
        steps (adaptive optimizers).

    Raises:
        ValueError: missing columns, no rows, non-increasing times, non-finite coefficients.
        UnmodelledUpdateError: steps whose update the coefficients do not describe
            (:func:`check_modelled`: an optimizer without a rule, an edited gradient).
    """
    df = load_record(record) if not isinstance(record, pd.DataFrame) else record
    check_modelled(df)
    K_col = network_column("sigma1")
    coefficients = [network_column(name) for name in LOG_K_COEFFICIENTS]  # μ_Z, κ_Z, λ_Z²
    need = ["step", "t", "Z", K_col, *coefficients]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"the record lacks the column(s) {missing} needed for the prediction")
    if degenerate not in ("exclude", "include"):
        raise ValueError(f"degenerate must be 'exclude' or 'include', got {degenerate!r}")
    df = df.sort_values("step")
    flagged = degenerate_steps(df)
    if degenerate == "exclude":
        df = drop_degenerate(df)
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
    K0 = float(df[K_col].iloc[0])
    mu, kappa, lam2 = (df[c].to_numpy(dtype=np.float64)[:-1] for c in coefficients)
    # Each coefficient holds for its own Δt_i: integrate with dt = 1 over f_i·Δt_i (left sums).
    mom = lipschitz_moments(K0, mu * dt, kappa * dt, lam2 * dt, dt=1.0)
    out = pd.DataFrame(
        {
            "step": df["step"].to_numpy(dtype=np.int64),
            "t": t,
            "K_observed": df[K_col].to_numpy(dtype=np.float64),
            "Z_observed": df["Z"].to_numpy(dtype=np.float64),
            "Z_path": mom.mean_Z,
            "K_path": np.exp(mom.mean_Z),
            "K_mean": mom.mean_K,
            "K_std": mom.std_K,
            "Z_mean": mom.mean_Z,
            "Z_std": np.sqrt(mom.var_Z),
            "degenerate": df["step"].isin(flagged).to_numpy(),
        }
    )
    step_col = network_column("step_curvature")
    if step_col in df.columns:
        # Beyond Thm 17: the mean with the O(η) drift of the discrete step added (docs/theory.md §6),
        # E[K] ≈ K0 exp ∫(μ_Z + κ_Z + step_curvature_Z). NaN where a record predates the column.
        sc = df[step_col].to_numpy(dtype=np.float64)[:-1]
        out["K_mean_discrete"] = mom.mean_K * np.exp(np.concatenate([[0.0], np.cumsum(sc * dt)]))
        steps = _step_product_mean(df, K0, dt)
        if steps is not None:
            out["K_mean_steps"] = steps
    out.attrs["degenerate_steps"] = flagged
    out.attrs["degenerate_policy"] = degenerate
    return out
