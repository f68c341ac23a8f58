"""The ensemble validation's statistics: variance ratios with intervals and the tables' rows.

Real SGD against the reduced SDE (:func:`analyse`, :func:`rows_for`: the summary table),
against the parameter SDE and the reduced SDE side by side (:func:`three_way`), per layer
(:func:`layer_rows`) and across layers (:func:`correlation_rows`). The variance ratios
carry a χ² interval (:func:`var_ratio_interval`) or a percentile bootstrap one
(:func:`bootstrap_var_ratio`).
"""

from __future__ import annotations

import attrs
import numpy as np

from ensemble_results import ParameterSDEEnsemble, RealEnsemble
from ensemble_settings import QUANTILES, VARIANTS

__all__ = ["VarRatio", "ReducedComparison", "var_ratio_interval", "bootstrap_var_ratio", "analyse", "rows_for",
           "three_way", "layer_rows", "correlation_rows", "mean_coefficient", "initial_layer_norms"]


@attrs.frozen
class VarRatio:
    """Var(a) / Var(b) with a percentile bootstrap interval (arrays of the samples' leading shape).

    Attributes:
        ratio: the ratio of the sample variances.
        low: the interval's lower end.
        high: the interval's upper end.
    """

    ratio: np.ndarray
    low: np.ndarray
    high: np.ndarray


@attrs.frozen
class ReducedComparison:
    """One sampling scheme's real runs against the reduced SDE and its ablations (:func:`analyse`).

    Attributes:
        K_obs: (N, T + 1) the runs' K at steps 0..T (row k before update k; T after the last).
        residual: (N, T + 1) each run's Thm 16 residual of Z = log K with its own coefficients.
        sims: variant name (:data:`VARIANTS`) → its :class:`sdelip.sde.SimulationResult`.
    """

    K_obs: np.ndarray
    residual: np.ndarray
    sims: dict


def var_ratio_interval(ratio: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Interval for Var_obs / Var_true from the χ²_{n−1} law of (n − 1) s² / σ² (Gaussian draws)."""
    from scipy.stats import chi2

    a = (1 - level) / 2
    return ratio * (n - 1) / chi2.ppf(1 - a, n - 1), ratio * (n - 1) / chi2.ppf(a, n - 1)


def bootstrap_var_ratio(a: np.ndarray, b: np.ndarray, n_boot: int, rng, fixed_b: bool = False,
                        level: float = 0.95) -> VarRatio:
    """Var(a) / Var(b) over the last axis of samples, with a percentile bootstrap interval.

    ``a`` is resampled with replacement; so is ``b`` unless ``fixed_b`` (a model whose
    variance is known to far better precision than the real runs'). Leading axes
    (e.g. time) are kept: the :class:`VarRatio`'s three arrays have their shape.
    """
    ratio = a.var(-1, ddof=1) / b.var(-1, ddof=1)
    ia = rng.integers(0, a.shape[-1], size=(n_boot, a.shape[-1]))
    va = np.take(a, ia, axis=-1).var(-1, ddof=1)  # (..., n_boot)
    if fixed_b:
        vb = b.var(-1, ddof=1)[..., None]
    else:
        ib = rng.integers(0, b.shape[-1], size=(n_boot, b.shape[-1]))
        vb = np.take(b, ib, axis=-1).var(-1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = va / vb
    q = (1 - level) / 2
    with np.errstate(invalid="ignore"):  # a resample of identical values: 0/0, ∞ − ∞ in the interpolation
        return VarRatio(ratio, np.nanquantile(r, q, axis=-1), np.nanquantile(r, 1 - q, axis=-1))


def mean_coefficient(records, layers, q: str) -> np.ndarray:
    """(T, L) the mean over the runs' records of the coefficient ``q`` (``"drift"``, ...) per step and layer."""
    return np.mean([r[[f"{q}/{name}" for name in layers]].to_numpy() for r in records], axis=0)


def initial_layer_norms(records, layers) -> np.ndarray:
    """(L,) K^(ℓ)(0) of the first record (the runs share their initialisation)."""
    return records[0][[f"K/{name}" for name in layers]].iloc[0].to_numpy()


def analyse(records, K_final, s, n_sde: int) -> ReducedComparison:
    """Reduced SDE (mean coefficients over the runs) against the runs, for every variant.

    Args:
        records: the runs' records (steps 0..T − 1).
        K_final: the runs' K after the last update.
        s: the scale's settings.
        n_sde: trajectories of every variant's simulation.
    """
    import torch

    import sdelip.analysis.plotting as splot
    from sdelip.sde import ReducedLipschitzSDE, simulate

    lr, N = s["lr"], len(records)
    layers = splot.layer_names(records[0])
    # Observed K at steps 0..T (row k: before update k; step T: after the last update).
    K_obs = np.stack([np.append(r["K"].to_numpy(), kf) for r, kf in zip(records, K_final)])
    mu, kappa, lam2 = (mean_coefficient(records, layers, q) for q in ("drift", "noise_curvature", "diffusion_sq"))
    K0 = initial_layer_norms(records, layers)
    spread0 = max(float(np.ptp([r[f"K/{name}"].iloc[0] for r in records])) for name in layers)
    if spread0 > 1e-6 * float(K0.max()):
        raise RuntimeError(f"the runs do not share their initialisation (K(0) differs by {spread0:g})")
    # Per-run Thm 16 residual of Z (each run's own coefficients, left sums).
    Z_obs = np.log(K_obs)
    a_run = np.stack([(r["drift_Z"] + r["noise_curvature_Z"] - 0.5 * r["diffusion_sq_Z"]).to_numpy() for r in records])
    Z_path = Z_obs[:, :1] + np.concatenate([np.zeros((N, 1)), np.cumsum(a_run, 1) * lr], 1)
    sims = {}
    for vname, switches in VARIANTS.items():
        sde = ReducedLipschitzSDE(mu, kappa, lam2, dt=lr, K0=K0, layer_names=layers, dtype=torch.float64, **switches)
        sims[vname] = simulate(sde, n_sde, sde.time_grid(every=1), dt=lr, seed=0, progress=False,
                               quantiles=QUANTILES)
    return ReducedComparison(K_obs=K_obs, residual=Z_obs - Z_path, sims=sims)


def rows_for(scheme, comparison: ReducedComparison, idx, s, n_train) -> list[dict]:
    """Summary rows at the fixed steps ``idx`` for every SDE variant of ``comparison``."""
    K_obs, resid, sims = comparison.K_obs, comparison.residual, comparison.sims
    N, lr = K_obs.shape[0], s["lr"]
    rows = []
    for vname, sim in sims.items():
        lo, hi = sim.quantiles[0], sim.quantiles[-1]
        for k in idx:
            obs = K_obs[:, k]
            v_obs, v_sde = float(obs.var(ddof=1)), float(sim.var_K[k])
            if v_sde <= (1e-10 * float(sim.mean_K[k])) ** 2:  # a single path (no diffusion): rounding only
                v_sde = 0.0
            ratio = v_obs / v_sde if v_sde > 0 else float("inf")
            ci = var_ratio_interval(ratio, N) if np.isfinite(ratio) else (float("inf"), float("inf"))
            sd_sde = float(np.sqrt(v_sde))
            rows.append({
                "sampling": scheme, "sde": vname, "step": int(k), "t": k * lr,
                "epochs": k * s["batch_size"] / n_train, "n_runs": N, "n_sde": sim.n,
                "frac_in_95_band": float(np.mean((obs >= lo[k]) & (obs <= hi[k]))),
                "var_obs_over_sde": ratio, "var_ratio_ci_low": ci[0], "var_ratio_ci_high": ci[1],
                "mean_obs": float(obs.mean()), "mean_sde": float(sim.mean_K[k]),
                "mean_bias_in_sde_sd": (float(obs.mean()) - float(sim.mean_K[k])) / sd_sde if sd_sde > 0
                else float("inf"),
                "sd_obs": float(np.sqrt(v_obs)), "sd_sde": sd_sde,
                "thm16_residual_Z_mean": float(resid[:, k].mean()),
                "thm16_residual_Z_sd": float(resid[:, k].std(ddof=1)),
                "log_mean_obs_over_sde": float(np.log(obs.mean() / sim.mean_K[k])),
            })
    return rows


def three_way(logK_real: np.ndarray, model_logK: dict, idx, s, rng, scheme: str, n_train: int) -> list[dict]:
    """Rows of the three-way table at the steps ``idx``.

    Args:
        logK_real: (T + 1, N) log K of the real runs.
        model_logK: model name → (T + 1, n) log K samples, or for the reduced SDE a
            SimulationResult (moments and quantiles of 10⁴+ trajectories, taken as exact).
    """
    rows = []
    for name, m in model_logK.items():
        for k in idx:
            real = logK_real[k]
            K = np.exp(real)
            row = {"sampling": scheme, "model": name, "step": int(k), "t": k * s["lr"],
                   "epochs": k * s["batch_size"] / n_train, "n_real": real.size}
            if isinstance(m, np.ndarray):
                z = m[k]
                z = z[np.isfinite(z)]
                if z.size < 2:
                    continue
                Km = np.exp(z)
                lo, hi = np.quantile(Km, [QUANTILES[0], QUANTILES[-1]])
                vr_K = bootstrap_var_ratio(K, Km, s["n_boot"], rng)
                vr_z = bootstrap_var_ratio(real, z, s["n_boot"], rng)
                row.update(n_model=z.size, mean_K_real=K.mean(), mean_K_model=Km.mean(),
                           var_K_real=K.var(ddof=1), var_K_model=Km.var(ddof=1),
                           var_ratio_K=float(vr_K.ratio), var_ratio_K_low=float(vr_K.low),
                           var_ratio_K_high=float(vr_K.high),
                           mean_logK_real=real.mean(), mean_logK_model=z.mean(),
                           var_logK_real=real.var(ddof=1), var_logK_model=z.var(ddof=1),
                           var_ratio_logK=float(vr_z.ratio), var_ratio_logK_low=float(vr_z.low),
                           var_ratio_logK_high=float(vr_z.high))
            else:  # the reduced SDE: 10⁴+ trajectories, its moments taken as exact; bootstrap the real runs only
                lo, hi = m.quantiles[0][k], m.quantiles[-1][k]
                ia = rng.integers(0, K.size, size=(s["n_boot"], K.size))
                vK, vz = K[ia].var(-1, ddof=1), real[ia].var(-1, ddof=1)
                q = (1 - 0.95) / 2
                row.update(n_model=m.n, mean_K_real=K.mean(), mean_K_model=float(m.mean_K[k]),
                           var_K_real=K.var(ddof=1), var_K_model=float(m.var_K[k]),
                           var_ratio_K=K.var(ddof=1) / float(m.var_K[k]),
                           var_ratio_K_low=float(np.quantile(vK, q)) / float(m.var_K[k]),
                           var_ratio_K_high=float(np.quantile(vK, 1 - q)) / float(m.var_K[k]),
                           mean_logK_real=real.mean(), mean_logK_model=float(m.mean_Z[k]),
                           var_logK_real=real.var(ddof=1), var_logK_model=float(m.var_Z[k]),
                           var_ratio_logK=real.var(ddof=1) / float(m.var_Z[k]),
                           var_ratio_logK_low=float(np.quantile(vz, q)) / float(m.var_Z[k]),
                           var_ratio_logK_high=float(np.quantile(vz, 1 - q)) / float(m.var_Z[k]))
            row["mean_bias_logK_in_model_sd"] = (row["mean_logK_real"] - row["mean_logK_model"]) / np.sqrt(
                row["var_logK_model"]) if row["var_logK_model"] > 0 else float("inf")
            row["coverage_95"] = float(np.mean((K >= lo) & (K <= hi)))
            rows.append({c: (float(v) if isinstance(v, (np.floating, float)) else v) for c, v in row.items()})
    return rows


def layer_rows(ensemble: RealEnsemble, sde: ParameterSDEEnsemble, layers, idx, s, rng, scheme: str,
               model: str = "layers (Assumption 3)") -> list[dict]:
    """Per-layer rows: log K^(ℓ) of the real runs (N, T + 1, L) against the parameter SDE's (T + 1, n, L).

    Also the median relative gap (σ1 − σ2)/σ1 of the real runs (from the records, step
    T read at T − 1) and of the simulated weights, and the pathwise spread of
    Itô-integrated minus direct log σ1 (the Euler error of Thm 14's integral at dt = η).
    """
    rows = []
    logk_real, gap_real = ensemble.log_K_layers, ensemble.relative_gap
    direct, ito, gap = sde.log_K_direct, sde.log_K_ito_sc, sde.relative_gap
    for j, name in enumerate(layers):
        for k in idx:
            real, z = logk_real[:, k, j], direct[k, :, j]
            z = z[np.isfinite(z)]
            vr = bootstrap_var_ratio(real, z, s["n_boot"], rng)
            diff = ito[k, :, j] - direct[k, :, j]
            rows.append({"sampling": scheme, "sde_noise": model, "layer": name, "step": int(k), "t": k * s["lr"],
                         "mean_logK_real": float(real.mean()), "mean_logK_sde": float(z.mean()),
                         "sd_logK_real": float(real.std(ddof=1)), "sd_logK_sde": float(z.std(ddof=1)),
                         "var_ratio": float(vr.ratio), "var_ratio_low": float(vr.low), "var_ratio_high": float(vr.high),
                         "median_rel_gap_real": float(np.median(gap_real[:, min(k, gap_real.shape[1] - 1), j])),
                         "median_rel_gap_sde": float(np.nanmedian(gap[k, :, j])),
                         "sd_ito_minus_direct": float(np.nanstd(diff, ddof=1)),
                         "mean_ito_minus_direct": float(np.nanmean(diff))})
    return rows


def correlation_rows(ensembles: dict, layers, step: int) -> list[dict]:
    """Per ensemble at ``step``: sd of every layer's log K^(ℓ), their correlations, and the sd of log K.

    ``ensembles`` maps a name to (members, L) arrays of log K^(ℓ). Real SGD moves all
    layers with one mini-batch; Assumption 3 makes the layers' noises independent.
    """
    rows = []
    for name, z in ensembles.items():
        z = z[np.isfinite(z).all(1)]
        c = np.corrcoef(z.T)
        row = {"ensemble": name, "step": int(step), "members": int(z.shape[0])}
        row.update({f"sd_logK/{layer}": float(z[:, j].std(ddof=1)) for j, layer in enumerate(layers)})
        row.update({f"corr/{layers[i]},{layers[j]}": float(c[i, j])
                    for i in range(len(layers)) for j in range(i + 1, len(layers))})
        row["sd_logK"] = float(z.sum(1).std(ddof=1))
        row["sd_logK_if_independent"] = float(np.sqrt((z.var(0, ddof=1)).sum()))
        rows.append(row)
    return rows
