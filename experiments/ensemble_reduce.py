"""The ensemble validation's iid and reshuffled comparison: its tables and figures from the task results.

``summary`` (the reduced SDE and its ablations), ``three_way``, ``layers`` and
``correlations`` (CSV and Markdown), ``summary.json``, and the figures of
:mod:`ensemble_figures`; the tables are described in ``ensemble_validation.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common import pick
from ensemble_figures import figure_reduced, figure_three_way
from ensemble_results import parameter_sde, real_ensembles
from ensemble_settings import INIT_SEED, MODELS, SCHEMES, SETTINGS, SHARED_MODEL
from ensemble_stats import analyse, correlation_rows, layer_rows, rows_for, three_way
from reporting import write_json, write_table

__all__ = ["reduce"]


def reduce(args, results: dict, out: Path) -> dict:
    """The iid and reshuffled comparison's tables and figures from the task results (``ensemble_validation.py``).

    Returns:
        The rows of every table (``rows``: summary, ``three_way``, ``layers``,
        ``correlations``), the figures' and tables' paths and the runs' summed seconds.
    """
    import time

    s = pick(args.scale, **SETTINGS)
    t_start = time.perf_counter()
    T, lr, N = s["steps"], s["lr"], s["n_runs"]
    real = real_ensembles(results, s)
    info = real["reshuffled"].info
    data, source, n_train = info["data"], info["data_source"], info["n_train"]
    K0s = {sc: float(real[sc].records[0]["K"].iloc[0]) for sc in SCHEMES}
    if max(K0s.values()) - min(K0s.values()) > 1e-6 * max(K0s.values()):
        raise RuntimeError(f"the sampling schemes do not share their initialisation: K(0) = {K0s}")
    sde = parameter_sde(results)
    shared = parameter_sde(results, "shared")
    K0_sde = float(np.exp(sde.log_K_direct[0, 0].sum()))
    if abs(K0_sde - K0s["reshuffled"]) > 1e-4 * K0s["reshuffled"]:
        raise RuntimeError(f"the parameter SDE starts at K(0) = {K0_sde:.6g}, the real runs at {K0s['reshuffled']:.6g}")
    layers = sde.chunks[0].value["layers"]

    idx = np.unique(np.round(np.linspace(0, T, s["n_checkpoints"] + 1)[1:]).astype(int))
    rows, comparisons = [], {}
    for scheme in SCHEMES:
        comparisons[scheme] = analyse(real[scheme].records, real[scheme].K_final, s, s["n_sde"])
        rows += rows_for(scheme, comparisons[scheme], idx, s, n_train)
    reduced_full = {scheme: c.sims["full"] for scheme, c in comparisons.items()}

    rng = np.random.default_rng(0)
    models = {MODELS[0]: sde.log_K_direct.sum(-1), MODELS[1]: (sde.log_K_ito_sc - sde.int_step_curvature).sum(-1),
              MODELS[2]: sde.log_K_ito_sc.sum(-1)}
    if shared is not None:
        models[SHARED_MODEL] = shared.log_K_direct.sum(-1)
    tw_rows, lay_rows = [], []
    for scheme in SCHEMES:
        tw_rows += three_way(real[scheme].log_K, {**models, MODELS[3]: reduced_full[scheme]}, idx, s, rng, scheme,
                             n_train)
        lay_rows += layer_rows(real[scheme], sde, layers, idx, s, rng, scheme)
        if shared is not None:
            lay_rows += layer_rows(real[scheme], shared, layers, idx, s, rng, scheme, model="shared noise")
    ensembles = {f"real SGD, {sc}": real[sc].log_K_layers[:, T] for sc in SCHEMES}
    ensembles["parameter SDE"] = sde.log_K_direct[T]
    if shared is not None:
        ensembles["parameter SDE, shared noise"] = shared.log_K_direct[T]
    corr_rows = correlation_rows(ensembles, layers, T)

    title = f"Ensemble validation ({data}; {args.scale} scale)"
    fig_path = figure_reduced(out, comparisons, s, n_train, N, title)
    fig3 = figure_three_way(out, real, sde, reduced_full, layers, s, n_train,
                            f"Real SGD vs the parameter SDE (Def 4/10) vs the reduced SDE (Thm 17); {data}, "
                            f"{args.scale} scale", shared=shared)
    chunks = sde.chunks
    n_sde = sde.n
    seconds_real = sum(r.seconds for name, r in results.items() if not name.startswith("parameter-sde"))
    seconds_sde = sde.seconds
    seconds_shared = shared.seconds if shared is not None else 0
    setup = (f"Scale: {args.scale}; model {s['model']}, η = {lr}, M = {s['batch_size']}, {T} steps "
             f"({T * s['batch_size'] / n_train:.2f} epochs of {n_train} samples), init seed {INIT_SEED}, {N} runs per "
             f"sampling scheme (seeds 1–{N}), every step tracked (decomposition {s['decomposition']!r}).")
    notes = [
        f"Data: {data} — {source}.",
        setup + f" Reduced SDE: {s['n_sde']} trajectories of the Z-system with the per-step mean of the records' "
        "μ, κ, ‖λ‖² (see the script's docstring).",
        *(f"Sampling '{k}': {v}." for k, v in SCHEMES.items()),
        f"Binomial sd of frac_in_95_band for N = {N}: {np.sqrt(0.95 * 0.05 / N):.3f}; var_ratio_ci: 95% χ² "
        "interval of the observed/SDE variance ratio (assumes Gaussian K).",
    ]
    for scheme in SCHEMES:
        last = {r["sde"]: r for r in rows if r["sampling"] == scheme and r["step"] == idx[-1]}
        f = last["full"]
        notes += [
            f"{scheme}, step {f['step']} (full SDE): {f['frac_in_95_band']:.0%} of the runs inside the band, Var "
            f"ratio {f['var_obs_over_sde']:.3g} [{f['var_ratio_ci_low']:.3g}, {f['var_ratio_ci_high']:.3g}], mean "
            f"bias {f['mean_bias_in_sde_sd']:.3g} SDE sd; Thm 16 residual of Z with each run's own coefficients "
            f"{f['thm16_residual_Z_mean']:.3g} ± {f['thm16_residual_Z_sd']:.3g} against log(mean_obs / mean_SDE) = "
            f"{f['log_mean_obs_over_sde']:.3g}.",
            f"{scheme}, removing a term at the same step: " + "; ".join(
                f"{v}: {r['frac_in_95_band']:.0%} inside, Var ratio {r['var_obs_over_sde']:.3g}, bias "
                f"{r['mean_bias_in_sde_sd']:.3g} sd" for v, r in last.items() if v != "full") + ".",
        ]
    notes += [
        "var_obs_over_sde and mean_bias_in_sde_sd are inf where the SDE has no variance (without diffusion).",
        f"Runtime (summed over tasks): real runs {seconds_real:.0f} s, parameter SDE {seconds_sde:.0f} s.",
    ]
    csv_path, md_path = write_table(rows, out, title="Ensemble validation: real runs vs the reduced SDE", notes=notes)

    tw_notes = [
        f"Data: {data} — {source}.", setup,
        f"Parameter SDE: {n_sde} trajectories of LipschitzSDE(model, loader) from the same initial parameters "
        f"({len(chunks)} tasks), Euler–Maruyama with dt = η, noise from M = {s['batch_size']} samples drawn with "
        f"replacement, drift from an independent batch of B = {s['grad_batch_size']} per trajectory and step with the "
        f"diffusion scaled by {chunks[0].value['noise_scale']:.4g} = √(1 − M/B) (Def 4's step covariance kept); "
        f"Π σ1(θ) every {s['direct_every']} step(s).",
        "Models: 'Π σ1(θ)' is K of the simulated parameters (Def 10, the discrete Euler steps included); 'Itô' is "
        "exp of Thm 14's integrated log K (μ + κ − ½‖λ‖², λ dB); 'Itô + step curvature' adds the O(η) drift "
        "(η/2σ1)∇Lᵀ H ∇L of a discrete step; 'reduced SDE (Thm 17)' as in summary.md (full system).",
        f"var_ratio_*: Var(real) / Var(model) with a {s['n_boot']}-resample percentile bootstrap 95% interval "
        "(real runs resampled, and the parameter SDE's trajectories; the reduced SDE's variance, from "
        f"{s['n_sde']} trajectories, taken as exact). coverage_95: fraction of the real runs inside the model's "
        f"central 95% band (empirical quantiles; from {n_sde} trajectories the band's ends are themselves noisy).",
        "Real iid runs draw M distinct samples per step; the SDE's noise batch draws with replacement "
        f"(finite-population factor 1 − (M − 1)/(n − 1) = {1 - (s['batch_size'] - 1) / (n_train - 1):.3f} on the "
        "noise variance, negligible here).",
        *([f"'{SHARED_MODEL}': {shared.n} more trajectories with "
           "noise_coupling='shared' (one M-dimensional Brownian motion for all layers: the full covariance of the "
           "mini-batch gradient across layers, Assumption 3 dropped); otherwise the same."] if shared is not None else []),
        f"Runtime (summed over tasks): parameter SDE {seconds_sde:.0f} s "
        f"({seconds_sde / max(n_sde * T, 1) * 1e3:.0f} ms per trajectory-step), real runs {seconds_real:.0f} s"
        + (f", parameter SDE with shared noise {seconds_shared:.0f} s." if shared is not None else "."),
    ]
    write_table(tw_rows, out, stem="three_way", title="Real SGD vs the parameter SDE vs the reduced SDE",
                notes=tw_notes)
    write_table(lay_rows, out, stem="layers", title="Per layer: log K^(ℓ) of real SGD vs the parameter SDE (Π σ1)",
                notes=[f"Data: {data}.", setup, "var_ratio: Var(real) / Var(parameter SDE) of log K^(ℓ), bootstrap "
                       "95% interval.", "median_rel_gap_*: median over the runs / trajectories of (σ1 − σ2)/σ1 "
                       "(Assumption 11; Thm 14's Itô expansion of log σ1 needs the step to be small against it).",
                       "sd_ito_minus_direct, mean_ito_minus_direct: across the parameter SDE's trajectories, Itô-integrated "
                       "log K^(ℓ) (step curvature included) minus log σ1 of the same simulated weights: the Euler "
                       "error of the integral at dt = η, pathwise."])
    write_table(corr_rows, out, stem="correlations", title=f"Per-layer spread and correlation of log K^(ℓ) at step {T}",
                notes=[f"Data: {data}.", setup, "sd_logK: of the network's log K = Σ_ℓ log K^(ℓ); "
                       "sd_logK_if_independent: what it would be with uncorrelated layers."])
    write_json({"scale": args.scale, "settings": s, "data": data, "data_source": source, "schemes": SCHEMES,
                "seconds_real": seconds_real, "seconds_parameter_sde": seconds_sde,
                "seconds_reduce": time.perf_counter() - t_start, "rows": rows, "three_way": tw_rows,
                "layers": lay_rows, "correlations": corr_rows, "seconds_parameter_sde_shared": seconds_shared},
               out / "summary.json")
    return {"rows": rows, "three_way": tw_rows, "layers": lay_rows, "correlations": corr_rows, "figure": fig_path, "figure_three_way": fig3,
            "csv": csv_path, "md": md_path, "seconds": seconds_real + seconds_sde}
