"""Fig 5 (Sec 8.6, Prop 21): the batch size M against the uncertainty Var[K(t)].

For every batch size M the same initialisation (seed 1) is trained with several
sampling seeds; Var[K(t)] across the seeds at a few fixed steps is set against 1/M.
Prop 21 says Var[K(t)] ≈ E[K(t)]² C / M with C = M ∫λ_Z² dt independent of M. The
script reports, per fixed step,

- the least-squares fit Var[K] ≈ a + b/M (slope b, R², Spearman rank correlation
  between Var[K] and 1/M) of the observed variances;
- the same fit of Thm 17's predicted variance E[K]² (exp ∫λ_Z² − 1), with ∫λ_Z² from the
  runs' own records (sparse tracking at quick scale: the integral over recorded steps);
- Prop 21's constant Ĉ(M) = M ∫λ_Z² dt per batch size and its coefficient of variation
  across M (constant C ⇔ λ_Z² ∝ 1/M), which tests the 1/M scaling of the diffusion
  directly, without the sampling error of a variance over a few seeds.

Run ``python experiments/fig5_batch_size.py --quick`` from the repository root.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import pick, record_path, run_experiment, runtime_note  # noqa: E402
from fits import linear_fit, spearman  # noqa: E402
from reporting import write_json, write_table  # noqa: E402


NAME = "fig5_batch_size"

SETTINGS = {
    "tiny": dict(model="mlp", dataset="mnist-embedded", lr=0.01, batch_sizes=[8, 16, 32], seeds=[1, 2, 3], steps=6,
                 track_every=3, max_train_samples=None, fixed_steps=[3]),
    "quick": dict(model="mlp", dataset="mnist", lr=0.01, batch_sizes=[32, 64, 128, 256], seeds=[1, 2, 3, 4, 5, 6],
                  steps=400, track_every=20, max_train_samples=None, fixed_steps=[100, 200, 380]),
    "paper": dict(model="convnet", dataset="cifar10", lr=1e-3, batch_sizes=list(range(32, 385, 32)),
                  seeds=[1, 2, 3, 4, 5], steps=39_000, track_every=100, max_train_samples=None,
                  fixed_steps=[5_000, 10_000, 20_000, 38_900]),
}

INIT_SEED = 1


def integrated_diffusion(record, upto_step: int) -> float:
    """∫_0^{t} λ_Z² dt over the recorded rows before ``upto_step`` (each row holds until the next one)."""
    steps = record["step"].to_numpy()
    lam2 = record["diffusion_sq_Z"].to_numpy()
    lr = float(record["lr"].iloc[0])
    nxt = np.append(steps[1:], upto_step)
    keep = steps < upto_step
    widths = np.clip(np.minimum(nxt, upto_step) - steps, 0, None)
    return float((lam2[keep] * widths[keep]).sum() * lr)


def tasks(args) -> list:
    """One training run per (batch size, sampling seed), the initialisation seed fixed."""
    from common import task_gpus, train_task
    from sdelip.workbench.sweep import Task

    s = pick(args.scale, **SETTINGS)
    return [Task(name=f"M={M}/seed={seed}", fn=train_task, config={"train": dict(
        model=s["model"], dataset=s["dataset"], data_root=args.data_root, download=args.download, lr=s["lr"],
        batch_size=M, steps=s["steps"], init_seed=INIT_SEED, sampling_seed=seed, track=True,
        track_every=s["track_every"], split=False, max_train_samples=s["max_train_samples"], device=args.device,
        eval_test=False), "n_train": True}, gpus=task_gpus(args))
        for M in s["batch_sizes"] for seed in s["seeds"]]


def reduce(args, results: dict, out: Path) -> dict:
    """Var[K(t)] per batch size from the records, the 1/M fits, the figure and the tables."""
    import sdelip.analysis.plotting as splot
    from sdelip.record import load_record

    s = pick(args.scale, **SETTINGS)
    data = source = None
    detail = []  # one row per (M, fixed step)
    for M in s["batch_sizes"]:
        Ks = {st: [] for st in s["fixed_steps"]}
        ints = {st: [] for st in s["fixed_steps"]}
        for seed in s["seeds"]:
            res = results[f"M={M}/seed={seed}"]
            data, source, n_train = res.value["data"], res.value["data_source"], res.value["n_train"]
            rec = load_record(record_path(res)).set_index("step", drop=False)
            for st in s["fixed_steps"]:
                if st not in rec.index:
                    raise ValueError(f"step {st} was not recorded (track_every={s['track_every']})")
                Ks[st].append(float(rec.loc[st, "K"]))
                ints[st].append(integrated_diffusion(rec, st))
        for st in s["fixed_steps"]:
            K = np.asarray(Ks[st])
            mean, var = float(K.mean()), float(K.var(ddof=1))
            I = float(np.mean(ints[st]))
            var_pred = mean ** 2 * float(np.expm1(I))
            detail.append({"M": M, "step": st, "t": st * s["lr"], "epochs": st * M / n_train,
                           "n_seeds": len(K), "mean_K": mean,
                           "var_K_observed": var, "var_K_predicted_thm17": var_pred,
                           "observed_over_predicted": var / var_pred if var_pred > 0 else float("nan"),
                           "int_lambda2_Z": I, "C_hat_prop21": M * I})

    rows = []
    for st in s["fixed_steps"]:
        d = [r for r in detail if r["step"] == st]
        inv = [1.0 / r["M"] for r in d]
        obs = [r["var_K_observed"] for r in d]
        prd = [r["var_K_predicted_thm17"] for r in d]
        C = np.array([r["C_hat_prop21"] for r in d])
        fo, fp = linear_fit(inv, obs), linear_fit(inv, prd)
        # log-log slope of Var[K] against M: Prop 21 says −1.
        lo = linear_fit(np.log([r["M"] for r in d]), np.log(np.maximum(obs, 1e-300)))
        lp = linear_fit(np.log([r["M"] for r in d]), np.log(np.maximum(prd, 1e-300)))
        rows.append({"step": st, "t": st * s["lr"], "batch_sizes": " ".join(str(r["M"]) for r in d),
                     "slope_observed": fo["slope"], "intercept_observed": fo["intercept"], "r2_observed": fo["r2"],
                     "spearman_observed": spearman(inv, obs), "loglog_slope_observed": lo["slope"],
                     "loglog_slope_predicted": lp["slope"],
                     "slope_predicted": fp["slope"], "r2_predicted": fp["r2"],
                     "C_hat_mean": float(C.mean()), "C_hat_cv_across_M": float(C.std(ddof=1) / C.mean()),
                     "mean_obs_over_pred": float(np.mean([r["observed_over_predicted"] for r in d]))})

    plt = splot._plt()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    Ms = np.array(s["batch_sizes"], dtype=float)
    for k, st in enumerate(s["fixed_steps"]):
        d = [r for r in detail if r["step"] == st]
        obs = np.array([r["var_K_observed"] for r in d])
        prd = np.array([r["var_K_predicted_thm17"] for r in d])
        fo = rows[k]
        axes[0].plot(1 / Ms, obs, "o", color=f"C{k}", label=f"observed, step {st} (R² {fo['r2_observed']:.2f})")
        axes[0].plot(1 / Ms, prd, "x--", color=f"C{k}", lw=0.8, label=f"Thm 17 from records, step {st}")
        xs = np.linspace(0, 1 / Ms.min(), 20)
        axes[0].plot(xs, fo["intercept_observed"] + fo["slope_observed"] * xs, color=f"C{k}", lw=0.6, alpha=0.6)
        axes[1].loglog(Ms, obs, "o-", color=f"C{k}",
                       label=f"observed, step {st} (slope {fo['loglog_slope_observed']:.2f})")
        axes[1].loglog(Ms, prd, "x--", color=f"C{k}", lw=0.8, label=f"Thm 17, step {st}")
        axes[2].plot(Ms, [r["C_hat_prop21"] for r in d], "o-", color=f"C{k}", label=f"step {st}")
    axes[0].set_xlabel("1 / M")
    axes[0].set_ylabel(f"Var[K(t)] across {len(s['seeds'])} sampling seeds")
    axes[0].legend(fontsize=7)
    axes[0].set_title("Prop 21: Var[K] ∝ 1/M")
    ref = np.array([Ms.min(), Ms.max()])
    top = max(r["var_K_predicted_thm17"] for r in detail)
    axes[1].loglog(ref, top * ref.min() / ref, color="0.5", lw=0.8, ls=":", label="slope −1 (Prop 21)")
    axes[1].set_xlabel("batch size M")
    axes[1].set_ylabel("Var[K(t)]")
    axes[1].set_title("log-log: Prop 21 predicts slope −1")
    axes[1].legend(fontsize=6)
    axes[2].set_xlabel("batch size M")
    axes[2].set_ylabel("Ĉ = M ∫λ_Z² dt")
    axes[2].set_title("Prop 21's constant C per batch size")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Fig 5 — batch size ({data}; {args.scale} scale)")
    fig.tight_layout()
    fig_path = splot.save_figure(fig, out / "fig5_batch_size.png")

    last = rows[-1]
    notes = [
        f"Data: {data} — {source}.",
        f"Scale: {args.scale}; model {s['model']}, η = {s['lr']}, M ∈ {s['batch_sizes']}, {s['steps']} steps, "
        f"init seed {INIT_SEED}, sampling seeds {s['seeds']}, tracked every {s['track_every']} steps.",
        "slope/intercept/r2_observed: least squares Var[K] ≈ a + b/M of the across-seed variances (ddof = 1); "
        "spearman_observed: rank correlation of Var[K] with 1/M.",
        "slope/r2_predicted: the same fit of Thm 17's E[K]²(exp ∫λ_Z² − 1), ∫ from each run's record, "
        "averaged over seeds.",
        "loglog_slope_*: slope of log Var[K] against log M (Prop 21: −1).",
        "C_hat = M ∫λ_Z² dt (Prop 21's C); C_hat_cv_across_M is its coefficient of variation across batch sizes "
        "(0 ⇔ exact 1/M scaling of the diffusion).",
        f"At step {last['step']}: observed slope {last['slope_observed']:.3g} (R² {last['r2_observed']:.3f}, "
        f"Spearman {last['spearman_observed']:.3f}, log-log slope {last['loglog_slope_observed']:.3g}); "
        f"Ĉ varies by {last['C_hat_cv_across_M']:.1%} across M; "
        f"observed/predicted variance {last['mean_obs_over_pred']:.3g} on average.",
        "epochs (by_batch_size) = step · M / training-set size: sdelip.workbench.train reshuffles once per epoch (mini-batches "
        "without replacement), so at fixed θ an epoch's mini-batch noise sums to zero, which Thm 17 / Prop 21 "
        "(independent mini-batches) do not model; compare observed_over_predicted before and after the first epoch.",
        f"Per-batch-size numbers: by_batch_size.csv / by_batch_size.md. {runtime_note(results)}.",
    ]
    write_table(detail, out, stem="by_batch_size", title="Fig 5: Var[K(t)] per batch size and step")
    csv_path, md_path = write_table(rows, out, title="Fig 5: Var[K(t)] against 1/M (Prop 21)", notes=notes)
    seconds = sum(r.seconds for r in results.values())
    write_json({"scale": args.scale, "settings": s, "data": data, "data_source": source, "seconds": seconds,
                "rows": rows, "detail": detail}, out / "summary.json")
    return {"rows": rows, "detail": detail, "figure": fig_path, "csv": csv_path, "md": md_path,
            "seconds": seconds}


def main(argv=None) -> dict:
    """Run the experiment (see :func:`common.run_experiment`); returns the output paths and the summary rows."""
    return run_experiment(NAME, __doc__.splitlines()[0], tasks, reduce, argv)


if __name__ == "__main__":
    main()
