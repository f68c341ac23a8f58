"""Ensemble validation (beyond the paper): real SGD runs against the reduced SDE's law.

N real SGD runs differ only in their sampling seed (the initialisation is fixed). Each
is tracked every step. The reduced Z-system (Thm 14–17; ``sdelip.sde.ReducedLipschitzSDE``)
is then simulated with many trajectories and the real runs are read as draws from the
law it predicts. At fixed steps the script reports

- the fraction of real runs inside the SDE's central 95% band (expected 0.95, binomial
  sd √(0.95·0.05/N));
- the ratio of the observed Var[K] across the runs to the SDE's Var[K], with a 95%
  interval from the χ² distribution of a sample variance of N draws;
- the bias of the ensemble mean in SDE standard deviations, (mean_obs − mean_SDE) / sd_SDE;
- the per-run residual of Thm 16, Z_obs(t) − [Z(0) + ∫(μ + κ − ½λ²)] with each run's own
  coefficients (mean and sd across runs): the part of the change of log K that the
  terms of one record do not account for, separating a missing drift from an ensemble
  effect;

for the full system and with one term removed at a time (κ, the diffusion λ dW, the Itô
correction −½λ², the drift μ), so that the value of each term is measured.

Two sampling schemes are run, N runs each, from the same initialisation:
``reshuffled`` (``sdelip.train``: a fresh permutation per epoch, mini-batches without
replacement within it, as a DataLoader with shuffle=True does) and ``iid`` (every step
draws M distinct samples independently of the other steps, the independent mini-batches
that Def 4's SDE models). Within an epoch of reshuffled sampling the mini-batch noise at
fixed θ sums to zero, which the SDE does not know about; the iid control separates that
from the rest of the model.

Coefficients of the SDE. Along a real run the tracker evaluates μ on that step's
mini-batch, so μ_k of one record carries that run's own gradient noise; integrating one
record reproduces that run rather than the law of the runs. The SDE here therefore
takes, step by step and per layer, the *mean* of μ, κ and ‖λ‖² over the N records: the
mean of μ estimates the expected-gradient drift of Thm 14, and κ and ‖λ‖², which are
already expectations over the mini-batch, are only averaged. The initial state is the
(shared) K^(ℓ)(0).

Run ``python experiments/ensemble_validation.py --quick`` from the repository root.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import Timer, output_dir, parser, pick, single_thread, write_json, write_table  # noqa: E402


NAME = "ensemble_validation"

SETTINGS = {
    "tiny": dict(model="mlp", dataset="mnist-embedded", lr=0.05, batch_size=16, steps=6, n_runs=3,
                 max_train_samples=None, n_sde=2_000, n_checkpoints=3, decomposition="svd"),
    "quick": dict(model="mlp", dataset="mnist", lr=0.05, batch_size=64, steps=128, n_runs=16,
                  max_train_samples=None, n_sde=10_000, n_checkpoints=4, decomposition="gram"),
    "paper": dict(model="convnet", dataset="cifar10", lr=1e-3, batch_size=256, steps=5_000, n_runs=32,
                  max_train_samples=None, n_sde=100_000, n_checkpoints=8, decomposition="svd"),
}

INIT_SEED = 0

#: The SDE variants: name → include_* switches of ReducedLipschitzSDE.
VARIANTS = {
    "full": {},
    "without κ": {"include_noise_curvature": False},
    "without diffusion": {"include_diffusion": False},
    "without Itô correction": {"include_ito_correction": False},
    "without μ": {"include_drift": False},
}

QUANTILES = (0.025, 0.5, 0.975)


def var_ratio_interval(ratio: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Interval for Var_obs / Var_true from the χ²_{n−1} law of (n − 1) s² / σ² (Gaussian draws)."""
    from scipy.stats import chi2

    a = (1 - level) / 2
    return ratio * (n - 1) / chi2.ppf(1 - a, n - 1), ratio * (n - 1) / chi2.ppf(a, n - 1)


SCHEMES = {
    "reshuffled": "sdelip.train: a reshuffled permutation per epoch, batches without replacement within it",
    "iid": "control: every step draws M distinct samples uniformly, independently of the other steps",
}


def _config(s, args, seed, path):
    from sdelip.train import TrainConfig

    return TrainConfig(model=s["model"], dataset=s["dataset"], data_root=args.data_root, download=args.download,
                       lr=s["lr"], batch_size=s["batch_size"], steps=s["steps"], init_seed=INIT_SEED,
                       sampling_seed=seed, track=True, track_every=1, split=False, record=str(path),
                       decomposition=s["decomposition"], max_train_samples=s["max_train_samples"],
                       device=args.device, eval_test=False)


def _product_norm(model) -> float:
    import torch

    from sdelip.layers import tracked_layers
    from sdelip.spectral import weight_matrix

    with torch.no_grad():
        return float(np.exp(sum(np.log(float(torch.linalg.matrix_norm(weight_matrix(l.module.weight).double(), ord=2)))
                                for l in tracked_layers(model))))


def train_iid(cfg, seed: int):
    """Plain SGD like :func:`sdelip.train.train` (same model, initialisation, loss), tracked every step,
    but with independent mini-batches: step k takes M distinct samples drawn uniformly from a generator
    seeded by ``seed``, independently of the other steps (the sampling that Def 4's SDE models).

    Returns:
        (K after the last update, data name, data source).
    """
    import torch

    from sdelip.models import build_model
    from sdelip.regularizers import per_sample_loss
    from sdelip.tracker import Tracker
    from sdelip.train import prepare_data

    info = prepare_data(cfg)
    X, Y = next(iter(torch.utils.data.DataLoader(info.dataset, batch_size=len(info.dataset))))
    X = X.to(device=cfg.device, dtype=torch.float32)
    Y = torch.as_tensor(Y, dtype=torch.long).to(cfg.device)
    model = build_model(cfg.model, num_classes=info.num_classes, input_shape=info.input_shape,
                        seed=cfg.init_seed).to(cfg.device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    tracker = Tracker(model, opt, record=cfg.record, schedule=1, split=False, decomposition=cfg.decomposition,
                      example_input=X[:2], metadata={"sampling": SCHEMES["iid"], "init_seed": cfg.init_seed,
                                                     "sampling_seed": seed, "data": info.name,
                                                     "data_source": info.source})
    gen = torch.Generator().manual_seed(1_000_003 * seed + 7)
    n = len(Y)
    try:
        for _ in range(cfg.steps):
            idx = torch.randperm(n, generator=gen)[: cfg.batch_size].to(cfg.device)
            opt.zero_grad(set_to_none=True)
            losses, _ = per_sample_loss(model, X[idx], Y[idx], normalization=info.normalization)
            tracker.backward(losses)
            opt.step()
    finally:
        tracker.close()
    return _product_norm(model), info.name, info.source


def analyse(records, K_final, s, n_sde: int):
    """Reduced SDE (mean coefficients over the runs) against the runs, for every variant.

    Returns:
        (K_obs (N, T + 1), Thm 16 residuals (N, T + 1), {variant: SimulationResult}).
    """
    import torch

    import sdelip.plotting as splot
    from sdelip.sde import ReducedLipschitzSDE, simulate

    lr, N = s["lr"], len(records)
    layers = splot.layer_names(records[0])
    # Observed K at steps 0..T (row k: before update k; step T: after the last update).
    K_obs = np.stack([np.append(r["K"].to_numpy(), kf) for r, kf in zip(records, K_final)])

    def mean_table(q):  # mean coefficients across the runs, per step and layer
        return np.mean([r[[f"{q}/{name}" for name in layers]].to_numpy() for r in records], axis=0)

    mu, kappa, lam2 = mean_table("drift"), mean_table("noise_curvature"), mean_table("diffusion_sq")
    K0 = records[0][[f"K/{name}" for name in layers]].iloc[0].to_numpy()
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
    return K_obs, Z_obs - Z_path, sims


def rows_for(scheme, K_obs, resid, sims, idx, s, n_train) -> list[dict]:
    """Summary rows at the fixed steps ``idx`` for every SDE variant."""
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


def main(argv=None) -> dict:
    """Run the experiment; returns a dict with the output paths and the summary rows."""
    import sdelip.plotting as splot
    from sdelip.record import load_record
    from sdelip.train import prepare_data, train

    args = parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    out = output_dir(NAME, args)
    s = pick(args.scale, **SETTINGS)
    single_thread(args)
    T, lr, N = s["steps"], s["lr"], s["n_runs"]
    seeds = list(range(1, N + 1))
    records = {sc: [] for sc in SCHEMES}
    K_final = {sc: [] for sc in SCHEMES}
    with Timer() as t_train:
        for scheme in SCHEMES:
            for seed in seeds:
                path = out / f"record_{scheme}_seed{seed}.db"
                if path.exists():
                    path.unlink()
                cfg = _config(s, args, seed, path)
                if scheme == "reshuffled":
                    res = train(cfg, progress=not args.no_progress)
                    kf, data, source = res.K_final, res.data, res.data_source
                else:
                    kf, data, source = train_iid(cfg, seed)
                rec = load_record(path)
                if len(rec) != T or int(rec["step"].iloc[0]) != 0:
                    raise RuntimeError(f"{scheme} run {seed}: expected {T} tracked rows from step 0, got {len(rec)}")
                records[scheme].append(rec)
                K_final[scheme].append(kf)
    n_train = len(prepare_data(cfg))
    K0s = {sc: float(records[sc][0]["K"].iloc[0]) for sc in SCHEMES}
    if max(K0s.values()) - min(K0s.values()) > 1e-6 * max(K0s.values()):
        raise RuntimeError(f"the sampling schemes do not share their initialisation: K(0) = {K0s}")

    idx = np.unique(np.round(np.linspace(0, T, s["n_checkpoints"] + 1)[1:]).astype(int))
    rows, results = [], {}
    with Timer() as t_sim:
        for scheme in SCHEMES:
            K_obs, resid, sims = analyse(records[scheme], K_final[scheme], s, s["n_sde"])
            results[scheme] = (K_obs, sims)
            rows += rows_for(scheme, K_obs, resid, sims, idx, s, n_train)

    # Figure: one row of panels per sampling scheme.
    plt = splot._plt()
    fig, axes = plt.subplots(len(SCHEMES), 3, figsize=(16, 4.3 * len(SCHEMES)), squeeze=False)
    t = np.arange(T + 1) * lr
    for ax_row, (scheme, (K_obs, sims)) in zip(axes, results.items()):
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
            ax_row[1].axvline(e * n_train / s["batch_size"] * lr, color="0.7", ls=":", lw=0.8)
        ax_row[1].set_yscale("log")
        ax_row[1].set_xlabel("t")
        ax_row[1].set_title(f"{scheme}: Var[K] observed / SDE (dotted: epoch ends)", fontsize=10)
        ax_row[1].legend(fontsize=7)
        ax_row[2].axhline(0.95, color="0.5", ls="--", lw=0.8)
        ax_row[2].set_ylim(-0.02, 1.02)
        ax_row[2].set_xlabel("t")
        ax_row[2].set_title(f"{scheme}: fraction of real runs inside the 95% band", fontsize=10)
        ax_row[2].legend(fontsize=7)
    fig.suptitle(f"Ensemble validation ({data}; {args.scale} scale)")
    fig.tight_layout()
    fig_path = splot.save_figure(fig, out / "ensemble_validation.png")

    notes = [
        f"Data: {data} — {source}.",
        f"Scale: {args.scale}; model {s['model']}, η = {lr}, M = {s['batch_size']}, {T} steps "
        f"({T * s['batch_size'] / n_train:.2f} epochs of {n_train} samples), init seed {INIT_SEED}, {N} runs per "
        f"sampling scheme (seeds 1–{N}), every step tracked (decomposition {s['decomposition']!r}); SDE: "
        f"{s['n_sde']} trajectories of the reduced Z-system with the per-step mean of the records' μ, κ, ‖λ‖² "
        "(see the script's docstring).",
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
        f"Runtime: training {t_train.seconds:.0f} s, simulation {t_sim.seconds:.0f} s.",
    ]
    csv_path, md_path = write_table(rows, out, title="Ensemble validation: real runs vs the reduced SDE", notes=notes)
    write_json({"scale": args.scale, "settings": s, "data": data, "data_source": source, "schemes": SCHEMES,
                "seconds_train": t_train.seconds, "seconds_sim": t_sim.seconds, "rows": rows}, out / "summary.json")
    return {"rows": rows, "figure": fig_path, "csv": csv_path, "md": md_path,
            "seconds": t_train.seconds + t_sim.seconds}


if __name__ == "__main__":
    main()
