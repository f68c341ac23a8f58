"""The ensemble validation's figures of the iid and reshuffled comparison.

``three_way.png`` (:func:`figure_three_way`: real SGD, the parameter SDE and the reduced
SDE) and ``ensemble_validation.png`` (:func:`figure_reduced`: the reduced SDE and its
ablations). The reshuffle leg's figure is in :mod:`ensemble_reshuffle`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ensemble_results import ParameterSDEEnsemble
from ensemble_settings import QUANTILES, SCHEMES, VARIANTS
from ensemble_stats import bootstrap_var_ratio

__all__ = ["figure_three_way", "figure_reduced"]


def figure_three_way(out, real: dict, sde: ParameterSDEEnsemble, reduced: dict, layers, s, n_train, title,
                     shared: Optional[ParameterSDEEnsemble] = None):
    """K bands of the three ensembles, Var ratio against time, per-layer spread (``three_way.png``).

    Args:
        out: the output folder.
        real: scheme → :class:`RealEnsemble`.
        sde: the parameter SDE (layer-wise noise).
        reduced: scheme → the full reduced SDE's :class:`sdelip.sde.SimulationResult`.
        layers: the layers' names.
        s: the scale's settings.
        n_train: training-set size (epoch ends).
        title: the figure's title.
        shared: the parameter SDE with shared noise, if it ran.
    """
    import sdelip.analysis.plotting as splot

    plt = splot._plt()
    T, lr = s["steps"], s["lr"]
    t = np.arange(T + 1) * lr
    rng = np.random.default_rng(1)
    fig, axes = plt.subplots(len(SCHEMES), 3, figsize=(17, 4.5 * len(SCHEMES)), squeeze=False)
    direct = sde.log_K_direct  # (T + 1, n, L)
    shared_direct = None if shared is None else shared.log_K_direct  # (T + 1, n, L)
    has = np.isfinite(direct[:, 0, 0])
    Kd = np.exp(direct[has].sum(-1))  # (T', n)
    for ax_row, scheme in zip(axes, SCHEMES):
        logk_real = real[scheme].log_K_layers  # (N, T + 1, L)
        K_real = np.exp(logk_real.sum(-1))  # (N, T + 1)
        sim = reduced[scheme]
        ax = ax_row[0]
        ax.fill_between(t, sim.quantiles[0], sim.quantiles[-1], color="C3", alpha=0.15, label="reduced SDE 95%")
        ax.fill_between(t[has], np.quantile(Kd, 0.025, 1), np.quantile(Kd, 0.975, 1), color="C0", alpha=0.25,
                        label=f"parameter SDE 95% ({Kd.shape[1]} traj.)")
        ax.plot(t[has], Kd.mean(1), color="C0", lw=1.3, label="parameter SDE mean")
        if shared is not None:
            Ks = np.exp(shared_direct[has].sum(-1))
            ax.plot(t[has], np.quantile(Ks, 0.025, 1), color="C4", lw=0.9, ls="--",
                    label="parameter SDE, shared noise, 95%")
            ax.plot(t[has], np.quantile(Ks, 0.975, 1), color="C4", lw=0.9, ls="--")
        ax.plot(t, sim.mean_K, color="C3", lw=1.3, label="reduced SDE mean")
        for i, k in enumerate(K_real):
            ax.plot(t, k, color="k", lw=0.5, alpha=0.35, label=f"real SGD ({len(K_real)} runs)" if i == 0 else None)
        ax.set_xlabel("t = kη")
        ax.set_ylabel("K")
        ax.set_title(f"{scheme} sampling: K of real SGD and of the two SDEs", fontsize=10)
        ax.legend(fontsize=7)
        ax = ax_row[1]
        curves = {"parameter SDE, Π σ1(θ)": (np.exp(direct[has].sum(-1)), has, "C0"),
                  "parameter SDE, Itô": (np.exp((sde.log_K_ito_sc - sde.int_step_curvature).sum(-1)), None, "C2"),
                  "parameter SDE, Itô + step curv.": (np.exp(sde.log_K_ito_sc.sum(-1)), None, "C1")}
        if shared is not None:
            curves["parameter SDE, shared noise"] = (np.exp(shared_direct[has].sum(-1)), has, "C4")
        for label, (Km, mask, color) in curves.items():
            tt, KR = (t[mask], K_real[:, mask]) if mask is not None else (t, K_real)
            vr = bootstrap_var_ratio(KR.T[1:], Km[1:], 300, rng)
            ax.plot(tt[1:], vr.ratio, color=color, lw=1.2, label=f"real / {label}")
            ax.fill_between(tt[1:], vr.low, vr.high, color=color, alpha=0.15)
        ax.plot(t[1:], K_real.var(0, ddof=1)[1:] / sim.var_K[1:], color="C3", lw=1.2, label="real / reduced SDE")
        ax.axhline(1, color="0.5", lw=0.8)
        for e in range(1, int(T * s["batch_size"] / n_train) + 1):
            ax.axvline(e * (n_train // s["batch_size"]) * lr, color="0.7", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("t = kη")
        ax.set_title(f"{scheme}: Var[K] real / model (bootstrap 95%; dotted: epoch ends)", fontsize=10)
        ax.legend(fontsize=7)
        ax = ax_row[2]
        for j, name in enumerate(layers):
            ax.plot(t, logk_real[:, :, j].std(0, ddof=1), color=f"C{j}", lw=1.2, label=f"{name} real")
            ax.plot(t[has], direct[has, :, j].std(1, ddof=1), color=f"C{j}", lw=1.2, ls="--",
                    label=f"{name} parameter SDE")
            if shared is not None:
                ax.plot(t[has], shared_direct[has, :, j].std(1, ddof=1), color=f"C{j}", lw=1.0, ls=":",
                        label=f"{name} parameter SDE, shared noise")
        ax.set_xlabel("t = kη")
        ax.set_title(f"{scheme}: sd of log K^(ℓ) per layer (solid real, dashed SDE"
                     + (", dotted shared noise)" if shared is not None else ")"), fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return splot.save_figure(fig, Path(out) / "three_way.png")


def figure_reduced(out, comparisons: dict, s, n_train, N, title):
    """The reduced SDE and its ablations against the real runs, a row of panels per scheme (``ensemble_validation.png``).

    Args:
        out: the output folder.
        comparisons: scheme → its :class:`ReducedComparison`.
        s: the scale's settings.
        n_train: training-set size (epoch ends).
        N: real runs per scheme.
        title: the figure's title.
    """
    import sdelip.analysis.plotting as splot

    plt = splot._plt()
    T, lr = s["steps"], s["lr"]
    fig, axes = plt.subplots(len(SCHEMES), 3, figsize=(16, 4.3 * len(SCHEMES)), squeeze=False)
    t = np.arange(T + 1) * lr
    for ax_row, (scheme, comparison) in zip(axes, comparisons.items()):
        K_obs, sims = comparison.K_obs, comparison.sims
        full = sims["full"]
        splot.plot_simulation(t, dict(zip(QUANTILES, full.quantiles)), ax=ax_row[0], mean=full.mean_K,
                              observed=[(t, K) for K in K_obs], label="reduced SDE (full)")
        ax_row[0].plot(t, sims["without κ"].mean_K, color="C0", lw=1, ls="--", label="SDE mean without κ")
        ax_row[0].legend(fontsize=7)
        ax_row[0].set_title(f"{scheme} sampling: {N} real runs vs the SDE's 95% band", fontsize=10)
        for j, vname in enumerate(VARIANTS):
            if vname != "without diffusion":
                ax_row[1].plot(t[1:], K_obs.var(0, ddof=1)[1:] / sims[vname].var_K[1:], color=f"C{j}", label=vname)
            inside = ((K_obs >= sims[vname].quantiles[0]) & (K_obs <= sims[vname].quantiles[-1])).mean(0)
            ax_row[2].plot(t[1:], inside[1:], color=f"C{j}", lw=1, label=vname)
        ax_row[1].axhline(1, color="0.5", lw=0.8)
        for e in range(1, int(T * s["batch_size"] / n_train) + 1):  # epoch boundaries
            ax_row[1].axvline(e * (n_train // s["batch_size"]) * lr, color="0.7", ls=":", lw=0.8)
        ax_row[1].set_yscale("log")
        ax_row[1].set_xlabel("t")
        ax_row[1].set_title(f"{scheme}: Var[K] observed / SDE (dotted: epoch ends)", fontsize=10)
        ax_row[1].legend(fontsize=7)
        ax_row[2].axhline(0.95, color="0.5", ls="--", lw=0.8)
        ax_row[2].set_ylim(-0.02, 1.02)
        ax_row[2].set_xlabel("t")
        ax_row[2].set_title(f"{scheme}: fraction of real runs inside the 95% band", fontsize=10)
        ax_row[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return splot.save_figure(fig, Path(out) / "ensemble_validation.png")
