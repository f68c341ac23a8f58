"""Fig 3 (Sec 8.1, 8.3): the dynamics terms near convergence.

One long run without regularisation, tracked with the Prop 6 split of κ. The script
reports per layer and for the network, over the whole run and over its late half
(near convergence):

- the means of μ (optimization drift), κ (noise curvature) and ‖λ‖² (diffusion);
- κ split into the part from the variances (diag Σ) and the part from the covariances;
- the ratio κ_Z / |μ_Z| (the paper: κ is typically an order of magnitude below μ) and the
  covariance share |κ_cov| / (|κ_var| + |κ_cov|) (the paper: the covariances dominate);
- over the late window, the observed change of Z = log K against the integrals of
  μ_Z, κ_Z and −½λ_Z² (the paper: K keeps growing near convergence, driven by κ_Z).

Run ``python experiments/fig3_near_convergence.py --quick`` from the repository root.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import pick, record_path, run_experiment, runtime_note  # noqa: E402
from reporting import write_json, write_table  # noqa: E402


NAME = "fig3_near_convergence"

SETTINGS = {
    "tiny": dict(model="mlp", dataset="mnist-embedded", lr=0.05, batch_size=16, steps=16, track_every=2,
                 max_train_samples=None, smooth=1),
    "quick": dict(model="mlp", dataset="mnist", lr=0.05, batch_size=128, steps=3000, track_every=10,
                  max_train_samples=None, smooth=10),
    "paper": dict(model="convnet", dataset="cifar10", lr=1e-3, batch_size=256, steps=153_270, track_every="log",
                  max_train_samples=None, smooth=20),
}


def row_widths(steps: np.ndarray, end: int) -> np.ndarray:
    """Number of SGD steps each recorded row stands for (until the next row, the last until ``end``)."""
    steps = np.asarray(steps, dtype=np.int64)
    return np.diff(np.append(steps, end)).astype(float)


def term_stats(rec, widths: np.ndarray, lr: float, mask: np.ndarray, suffix: str) -> dict:
    """Step-weighted means and integrals of the terms of one layer (``/name``) or the network (``_Z``)."""
    w = widths[mask]

    def col(q):
        return rec[f"{q}{suffix}"].to_numpy()[mask]

    def mean(x):
        return float((x * w).sum() / w.sum())

    mu, ka, lam2 = col("drift"), col("noise_curvature"), col("diffusion_sq")
    kv, kc = col("noise_curvature_var"), col("noise_curvature_cov")
    m_mu, m_abs_mu, m_ka, m_kv, m_kc = mean(mu), mean(np.abs(mu)), mean(ka), mean(kv), mean(kc)
    return {
        "mean_mu": m_mu, "mean_abs_mu": m_abs_mu, "mean_kappa": m_ka,
        "kappa_over_abs_mu": m_ka / m_abs_mu if m_abs_mu > 0 else float("nan"),
        "mean_kappa_var": m_kv, "mean_kappa_cov": m_kc,
        "cov_share": abs(m_kc) / (abs(m_kv) + abs(m_kc)) if (abs(m_kv) + abs(m_kc)) > 0 else float("nan"),
        "mean_lambda2": mean(lam2),
        "int_mu": float((mu * w).sum() * lr), "int_kappa": float((ka * w).sum() * lr),
        "int_lambda2": float((lam2 * w).sum() * lr),
    }


def tasks(args) -> list:
    """The one long run, tracked with the Prop 6 split."""
    from common import task_gpus, train_task
    from sdelip.workbench.sweep import Task

    s = pick(args.scale, **SETTINGS)
    return [Task(name="run", fn=train_task, config={"train": dict(
        model=s["model"], dataset=s["dataset"], data_root=args.data_root, download=args.download, lr=s["lr"],
        batch_size=s["batch_size"], steps=s["steps"], init_seed=0, sampling_seed=0, track=True,
        track_every=s["track_every"], split=True, max_train_samples=s["max_train_samples"], device=args.device,
        eval_test=True)}, gpus=task_gpus(args))]


def reduce(args, results: dict, out: Path) -> dict:
    """Per-layer term statistics, the late-window growth, the figure and the tables from the record."""
    import sdelip.analysis.plotting as splot
    from sdelip.record import load_record

    s = pick(args.scale, **SETTINGS)
    run = results["run"]
    res = run.value
    rec = load_record(record_path(run))
    lr = s["lr"]
    steps = rec["step"].to_numpy()
    widths = row_widths(steps, s["steps"])
    layers = splot.layer_names(rec)
    half = s["steps"] // 2
    windows = {"whole run": np.ones(len(rec), bool), "late half": steps >= half}

    rows = []
    for wname, mask in windows.items():
        for name in layers + ["network"]:
            suffix = "_Z" if name == "network" else f"/{name}"
            rows.append({"layer": name, "window": wname, "from_step": int(steps[mask].min()),
                         **term_stats(rec, widths, lr, mask, suffix)})

    # Late-window growth: observed ΔZ against the integrals of the terms.
    late = windows["late half"]
    net_late = next(r for r in rows if r["layer"] == "network" and r["window"] == "late half")
    Z = rec["Z"].to_numpy()
    i0 = int(np.flatnonzero(late)[0])
    Z_end = float(np.log(res['K_final']))
    dZ_obs = Z_end - float(Z[i0])
    t_late = (s["steps"] - int(steps[i0])) * lr
    sde_dZ = net_late["int_mu"] + net_late["int_kappa"] - 0.5 * net_late["int_lambda2"]
    loss = rec["loss"].to_numpy()
    n_tail = max(1, len(loss) // 10)
    growth = {
        "late_window_steps": f"{int(steps[i0])}–{s['steps']}",
        "dZ_observed": dZ_obs, "growth_rate_dZ_dt": dZ_obs / t_late,
        "int_mu_Z": net_late["int_mu"], "int_kappa_Z": net_late["int_kappa"],
        "minus_half_int_lambda2_Z": -0.5 * net_late["int_lambda2"], "dZ_sde_sum": sde_dZ,
        "kappa_share_of_dZ": net_late["int_kappa"] / dZ_obs if dZ_obs != 0 else float("nan"),
        "final_train_loss_mean_last10pct": float(loss[-n_tail:].mean()),
        "K_initial": res['K_initial'], "K_final": res['K_final'],
    }

    # Figure: per-layer terms, κ split, K(t) and loss, κ_Z/|μ_Z|.
    plt = splot._plt()
    fig = plt.figure(figsize=(14, 8))
    gs = fig.add_gridspec(2, 3)
    axes_top = [fig.add_subplot(gs[0, k]) for k in range(3)]
    splot.plot_terms(rec, axes=axes_top, smooth=s["smooth"])
    ax = fig.add_subplot(gs[1, 0])
    splot.plot_noise_split(rec, ax=ax, smooth=s["smooth"], title="κ_Z: variances vs covariances (Prop 6)")
    ax = fig.add_subplot(gs[1, 1])
    t = rec["t"].to_numpy()
    ax.plot(t, rec["K"].to_numpy(), color="k", label="K(t) = Π σ1")
    ax.set_xlabel("t")
    ax.set_ylabel("K(t)")
    ax.axvline(half * lr, color="0.6", ls=":", lw=0.8)
    ax2 = ax.twinx()
    ax2.semilogy(t, splot._smooth(loss, s["smooth"]), color="C1", lw=0.8, label="training loss")
    ax2.set_ylabel("training loss", color="C1")
    ax.set_title("K(t) keeps growing? (dotted: late window)")
    ax = fig.add_subplot(gs[1, 2])
    ratio = splot._smooth(rec["noise_curvature_Z"].to_numpy(), s["smooth"]) / \
        np.maximum(splot._smooth(np.abs(rec["drift_Z"].to_numpy()), s["smooth"]), 1e-300)
    ax.semilogy(t, ratio, color="C4")
    ax.axhline(0.1, color="0.6", ls="--", lw=0.8, label="one order of magnitude")
    ax.set_xlabel("t")
    ax.set_title("κ_Z / |μ_Z| (smoothed)")
    ax.legend(fontsize=8)
    fig.suptitle(f"Fig 3 — dynamics near convergence ({res['data']}; {args.scale} scale)")
    fig.tight_layout()
    fig_path = splot.save_figure(fig, out / "fig3_near_convergence.png")

    net_all = next(r for r in rows if r["layer"] == "network" and r["window"] == "whole run")
    notes = [
        f"Data: {res['data']} — {res['data_source']}.",
        f"Scale: {args.scale}; model {s['model']}, η = {lr}, M = {s['batch_size']}, {s['steps']} steps, no "
        f"regularisation, tracked with schedule {s['track_every']!r} ({len(rec)} rows); means are weighted by the "
        "number of steps each recorded row stands for.",
        f"Final training loss (mean of the last 10% of rows) {growth['final_train_loss_mean_last10pct']:.3g}; "
        f"train accuracy {res['train_accuracy']:.3f}; test accuracy {res['test_accuracy']}.",
        f"κ_Z / |μ_Z| (means): {net_all['kappa_over_abs_mu']:.3g} over the run, "
        f"{net_late['kappa_over_abs_mu']:.3g} over the late half (paper: about 0.1).",
        f"Covariance share of κ_Z: {net_all['cov_share']:.3f} over the run, {net_late['cov_share']:.3f} late "
        "(paper: covariances dominate, i.e. > 0.5).",
        f"Late half ({growth['late_window_steps']}): ΔZ observed {dZ_obs:.4g} (rate {growth['growth_rate_dZ_dt']:.3g} "
        f"per unit t); ∫μ_Z {growth['int_mu_Z']:.4g}, ∫κ_Z {growth['int_kappa_Z']:.4g}, −½∫λ_Z² "
        f"{growth['minus_half_int_lambda2_Z']:.4g} (paper: K keeps growing near convergence).",
        "cov_share = |κ_cov| / (|κ_var| + |κ_cov|) of the means; κ_cov is not sign-definite.",
        f"Growth numbers: growth.csv / growth.md. {runtime_note(results)}.",
    ]
    write_table([growth], out, stem="growth", title="Fig 3: growth of Z = log K over the late half")
    csv_path, md_path = write_table(rows, out, title="Fig 3: dynamics terms near convergence", notes=notes)
    write_json({"scale": args.scale, "settings": s, "data": res['data'], "data_source": res['data_source'],
                "seconds": run.seconds, "rows": rows, "growth": growth}, out / "summary.json")
    return {"rows": rows, "growth": growth, "figure": fig_path, "csv": csv_path, "md": md_path,
            "seconds": run.seconds}


def main(argv=None) -> dict:
    """Run the experiment (see :func:`common.run_experiment`); returns the output paths and the summary rows."""
    return run_experiment(NAME, __doc__.splitlines()[0], tasks, reduce, argv)


if __name__ == "__main__":
    main()
