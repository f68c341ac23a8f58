"""The ensemble validation's reshuffle leg (issue #19): real reshuffled SGD against the epoch-pinned SDEs.

Its reduce step (:func:`reduce_reshuffle`: ``reshuffle.{csv,md}``, ``reshuffle.json``)
and figure (:func:`figure_reshuffle`: ``reshuffle.png``); the leg is described in
``ensemble_validation.py`` (``--reshuffle``, ``--reshuffle-only``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common import pick
from ensemble_results import parameter_sde, real_ensembles
from ensemble_settings import INIT_SEED, QUANTILES, RESHUFFLE_MODELS, SETTINGS
from ensemble_stats import bootstrap_var_ratio, initial_layer_norms, mean_coefficient, three_way
from reporting import write_json, write_table

__all__ = ["figure_reshuffle", "reduce_reshuffle"]


def figure_reshuffle(out, t, K_real, models_K, reduced, s, n_train, title):
    """Var[K](t) of real reshuffled SGD and the models, their ratios, and the relative mean (reshuffle.png).

    Args:
        out: the output folder.
        t: (T + 1,) times kη.
        K_real: (N, T + 1) K of the real reshuffled runs.
        models_K: model name → (T + 1, n) K of its trajectories.
        reduced: model name → the reduced system's :class:`sdelip.sde.SimulationResult`.
        s: the scale's settings.
        n_train: training-set size (epoch ends).
        title: the figure's title.
    """
    import sdelip.analysis.plotting as splot

    plt = splot._plt()
    rng = np.random.default_rng(1)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    per_epoch = n_train // s["batch_size"]
    colors = {RESHUFFLE_MODELS[0]: "C1", RESHUFFLE_MODELS[1]: "C0", RESHUFFLE_MODELS[2]: "C2", RESHUFFLE_MODELS[3]: "C3",
              RESHUFFLE_MODELS[4]: "C4"}
    v_real = K_real.var(0, ddof=1)
    ia = rng.integers(0, K_real.shape[0], size=(300, K_real.shape[0]))
    vb = np.stack([K_real[i].var(0, ddof=1) for i in ia])
    ax = axes[0]
    ax.plot(t[1:], v_real[1:], color="k", lw=1.6, label=f"real reshuffled SGD ({K_real.shape[0]} runs)")
    ax.fill_between(t[1:], np.quantile(vb, 0.025, 0)[1:], np.quantile(vb, 0.975, 0)[1:], color="k", alpha=0.12)
    for name, Km in models_K.items():
        ax.plot(t[1:], Km.var(1, ddof=1)[1:], color=colors[name], lw=1.2, label=f"{name} ({Km.shape[1]})")
    for name, sim in reduced.items():
        ax.plot(t[1:], sim.var_K[1:], color=colors[name], lw=1.2, ls="--", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("t = kη")
    ax.set_title("Var[K](t) (band: bootstrap 95% of the real runs)", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    for name, Km in models_K.items():
        vr = bootstrap_var_ratio(K_real.T[1:], Km[1:], 300, rng)
        ax.plot(t[1:], vr.ratio, color=colors[name], lw=1.2, label=f"real / {name}")
        ax.fill_between(t[1:], vr.low, vr.high, color=colors[name], alpha=0.15)
    for name, sim in reduced.items():
        ax.plot(t[1:], v_real[1:] / sim.var_K[1:], color=colors[name], lw=1.2, ls="--", label=f"real / {name}")
    ax.axhspan(0.5, 2.0, color="0.85", alpha=0.5, lw=0, label="target [0.5, 2]")
    ax.axhline(1, color="0.5", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("t = kη")
    ax.set_title("Var[K] real / model (bootstrap 95%)", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[2]
    m_real = K_real.mean(0)
    for name, Km in models_K.items():
        ax.plot(t, 100 * (Km.mean(1) / m_real - 1), color=colors[name], lw=1.2, label=name)
    for name, sim in reduced.items():
        ax.plot(t, 100 * (sim.mean_K / m_real - 1), color=colors[name], lw=1.2, ls="--", label=name)
    ax.axhspan(-1, 1, color="0.85", alpha=0.5, lw=0, label="±1 %")
    ax.set_xlabel("t = kη")
    ax.set_title("mean of K: model / real − 1 (%)", fontsize=10)
    ax.legend(fontsize=7)
    for ax in axes:
        for e in range(1, int(len(t) - 1) // per_epoch + 1):
            ax.axvline(e * per_epoch * s["lr"], color="0.7", ls=":", lw=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    return splot.save_figure(fig, Path(out) / "reshuffle.png")


def reduce_reshuffle(args, results: dict, out: Path) -> dict:
    """The reshuffle leg: real reshuffled SGD against the epoch-pinned parameter SDE and reduced system.

    Writes ``reshuffle.{csv,md}`` (the three-way table's columns at the same steps, with the
    bootstrap intervals) and ``reshuffle.png``; returns the rows and the target check.
    """
    import time

    import torch

    import sdelip.analysis.plotting as splot
    from sdelip.sde import ReducedLipschitzSDE, simulate

    t_start = time.perf_counter()
    s = pick(args.scale, **SETTINGS)
    T, lr, M = s["steps"], s["lr"], s["batch_size"]
    real = real_ensembles(results, s, ("reshuffled",))["reshuffled"]
    records, info = real.records, real.info
    data, source, n_train = info["data"], info["data_source"], info["n_train"]
    epoch_sde = parameter_sde(results, "reshuffle")
    if epoch_sde is None:
        raise RuntimeError("no parameter-sde-reshuffle task results: run with --reshuffle or --reshuffle-only")
    shared = parameter_sde(results, "shared")
    layers = splot.layer_names(records[0])
    mu, kappa, lam2 = (mean_coefficient(records, layers, q) for q in ("drift", "noise_curvature", "diffusion_sq"))
    K0 = initial_layer_norms(records, layers)
    S, alpha = n_train // M, M / n_train
    reduced = {}
    # The records' μ is each step's mini-batch's: along reshuffled SGD its mean carries the pinned noise's restoring
    # drift, so the pinned system keeps Thm 17's drift (drift_source="minibatch"; docs/theory.md §10).
    pinned = dict(steps_per_epoch=S, batch_fraction=alpha, drift_source="minibatch")
    step_curv = mean_coefficient(records, layers, "step_curvature")  # the O(η) drift of a discrete step (docs/theory.md §6), an ablation of the mean
    for name, epochs, extra in ((RESHUFFLE_MODELS[2], pinned, 0.0), (RESHUFFLE_MODELS[3], {}, 0.0),
                                (RESHUFFLE_MODELS[4], pinned, step_curv)):
        sde = ReducedLipschitzSDE(mu + extra, kappa, lam2, dt=lr, K0=K0, layer_names=layers, dtype=torch.float64,
                                  **epochs)
        reduced[name] = simulate(sde, s["n_sde"], sde.time_grid(every=1), dt=lr, seed=0, progress=False,
                                 quantiles=QUANTILES)
    samples = {RESHUFFLE_MODELS[0]: epoch_sde.log_K_direct.sum(-1)}
    if shared is not None:
        samples[RESHUFFLE_MODELS[1]] = shared.log_K_direct.sum(-1)
    logK_real = real.log_K  # (T + 1, N)
    idx = np.unique(np.round(np.linspace(0, T, s["n_checkpoints"] + 1)[1:]).astype(int))
    rng = np.random.default_rng(0)
    rows = three_way(logK_real, {**samples, **reduced}, idx, s, rng, "reshuffled", n_train)
    for r in rows:
        r["mean_K_model_over_real_minus_1"] = r["mean_K_model"] / r["mean_K_real"] - 1
        r["in_target"] = bool(0.5 <= r["var_ratio_K"] <= 2.0 and r["var_ratio_K_low"] <= 1.0 <= r["var_ratio_K_high"]
                              and abs(r["mean_K_model_over_real_minus_1"]) <= 0.01)
    after = [r for r in rows if r["epochs"] > 1.0 + 1e-9]
    target = {name: (all(r["in_target"] for r in after if r["model"] == name) if after else None)
              for name in (*samples, *reduced)}
    chunks = epoch_sde.chunks
    n_epoch = epoch_sde.n
    sec_epoch = sum(c.value["seconds"] for c in chunks)  # the simulation's own seconds (the tasks' values)
    sec_shared = shared.seconds if shared is not None else 0
    sec_real = sum(r.seconds for name, r in results.items() if name.startswith("reshuffled/"))
    setup = (f"Scale: {args.scale}; model {s['model']}, η = {lr}, M = {M}, {T} steps ({T * M / n_train:.2f} epochs of "
             f"{n_train} samples, S = {S} steps per epoch), init seed {INIT_SEED}, {len(records)} real reshuffled runs "
             f"(seeds 1–{len(records)}), every step tracked.")
    notes = [
        f"Data: {data} — {source}.", setup,
        f"'{RESHUFFLE_MODELS[0]}': {n_epoch} trajectories of ParameterSDE(model, loader, sampling='reshuffle') "
        f"({len(chunks)} tasks): the noise factor D(θ)/√(M(N − 1)) over all N = {n_train} samples on the "
        f"{n_train}-dimensional EpochBrownian pinned over every {S} steps (batch fraction M/N = {alpha:.4g}), drift "
        "−∇L on the whole training set from the same pass; Euler with dt = η; K = Π σ1(θ) of the simulated weights.",
        (f"'{RESHUFFLE_MODELS[1]}': {shared.n} trajectories of the iid parameter SDE with "
         "noise_coupling='shared' (the model that matches iid SGD, results.md), drift from independent batches of "
         f"B = {s['grad_batch_size']}." if shared is not None else f"'{RESHUFFLE_MODELS[1]}': not run."),
        f"'{RESHUFFLE_MODELS[2]}' and '{RESHUFFLE_MODELS[3]}': {s['n_sde']} trajectories of the reduced Z-system with "
        "the per-step mean of the reshuffled records' μ, κ, ‖λ‖², with epoch-pinned noise (steps_per_epoch = "
        f"{S}, batch_fraction = {alpha:.4g}; the records' mini-batch μ already carries the pinned noise's restoring "
        "drift, so the drift is Thm 17's: drift_source='minibatch') and with Thm 17's independent increments; "
        f"'{RESHUFFLE_MODELS[4]}' adds the records' mean step curvature (η/2σ1)∇LᵀH∇L to μ (the drift of a discrete "
        "step that the SDE drops, docs/theory.md §6): an ablation of the mean.",
        f"var_ratio_K: Var(real) / Var(model) with a {s['n_boot']}-resample percentile bootstrap 95% interval (real runs "
        "resampled, and the parameter SDEs' trajectories; the reduced systems' variance taken as exact). in_target: "
        "ratio in [0.5, 2], its interval containing 1 and the mean of K within 1 % (issue #19's target).",
        "Target met at every reported step after the first epoch: " + "; ".join(
            f"{name}: {'yes' if ok else 'no' if ok is not None else 'no step after the first epoch'}"
            for name, ok in target.items()) + ".",
        f"Runtime (summed over tasks): real reshuffled runs {sec_real:.0f} s, epoch-pinned parameter SDE {sec_epoch:.0f} s "
        f"({sec_epoch / max(n_epoch * T, 1):.2f} s per trajectory-step)"
        + (f", iid SDE with shared noise {sec_shared:.0f} s." if shared is not None else "."),
    ]
    csv_path, md_path = write_table(rows, out, stem="reshuffle",
                                    title="Reshuffled SGD vs the epoch-pinned SDEs (and the iid ones)", notes=notes)
    t = np.arange(T + 1) * lr
    K_real = np.exp(logK_real.T)  # (N, T + 1)
    fig = figure_reshuffle(out, t, K_real, {k: np.exp(v) for k, v in samples.items()}, reduced, s, n_train,
                           f"Reshuffled SGD against the epoch-pinned and the iid SDEs ({data}, {args.scale} scale)")
    summary = {"scale": args.scale, "settings": s, "data": data, "rows": rows, "target": target,
               "seconds_real_reshuffled": sec_real, "seconds_parameter_sde_reshuffle": sec_epoch,
               "seconds_parameter_sde_shared": sec_shared,
               "seconds_reduce": time.perf_counter() - t_start,
               "var_K_t": {"t": t.tolist(), "real": K_real.var(0, ddof=1).tolist(),
                           **{k: np.exp(v).var(1, ddof=1).tolist() for k, v in samples.items()},
                           **{k: sim.var_K.tolist() for k, sim in reduced.items()}}}
    write_json(summary, out / "reshuffle.json")
    return {"rows": rows, "target": target, "csv": csv_path, "md": md_path, "figure": fig}
