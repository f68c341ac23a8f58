"""Fig 6 / Sec 8.4: the Lipschitz bound under noisy gradients, ∇L_* = √ρ ∇L_f + √(1−ρ) n.

The paper trains the MLP of Table 2 on MNIST (η = 0.01, M = 128, plain SGD) with the
gradient scaled by √ρ and noise n ~ N(0, 1), U[−0.5, 0.5] or 0 added with weight √(1−ρ),
and claims that K decreases monotonically as ρ decreases. Its Eq. 26, which neglects
the curvature term of the injected isotropic noise, predicts

    E[K(t)] ≈ K(0) · [e^{∫μ_Z}]^{√ρ} · [e^{∫κ_Z}]^{ρ},

with ∫μ_Z and ∫κ_Z those of the noise-free run (ρ = 1).

This script sweeps ρ ∈ {0, 0.1, …, 1} for each noise kind (ρ = 1 is the same run for all
three kinds and is run once), and reports

* K at the end against ρ, with the Spearman rank correlation between ρ and K_end per
  noise kind (the paper's claim is Spearman = +1);
* the Eq. 26 prediction from the tracked integrals ∫μ_Z, ∫κ_Z of the ρ = 1 run;
* where runs are tracked, their own ∫μ_Z and ∫κ_Z (the tracker adds the injected noise
  variance (1 − ρ)·Var(n) to the gradient covariance, so ∫κ_Z includes the isotropic
  term that Eq. 26 drops).

Verdict per noise kind: "held" when Spearman ≥ 0.9, "held weakly" when ≥ 0.5, "did not
hold" otherwise.

Run ``python experiments/fig6_noisy_gradient.py --quick`` (a few minutes on 2 CPU cores,
bundled MNIST digits when the real MNIST is absent) or ``--paper``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import attrs

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repo on sys.path)
import fits  # noqa: E402
import reporting  # noqa: E402

NAME = "fig6_noisy_gradient"
NOISES = ("gaussian", "uniform", "zero")
#: Spearman thresholds of the verdict.
HELD, HELD_WEAKLY = 0.9, 0.5
#: Paper-scale training length for the MLP runs: 20 epochs of MNIST's 60,000 images at M = 128
#: (the paper states η and M but not the number of steps).
PAPER_MLP_STEPS = 20 * (60_000 // 128)


def grid(step: float) -> list[float]:
    """[0, step, 2·step, …, 1], rounded to avoid 0.30000000000000004."""
    n = int(round(1.0 / step))
    return [round(k / n, 10) for k in range(n + 1)]


def settings(scale: str) -> dict:
    """The sweep and training settings for a scale (paper: MLP, η = 0.01, M = 128)."""
    return {
        "rhos": common.pick(scale, tiny=[0.0, 0.5, 1.0], quick=grid(0.1), paper=grid(0.1)),
        "noises": NOISES,
        "seeds": common.pick(scale, tiny=[0], quick=[0, 1], paper=[0, 1, 2]),
        "lr": 0.01,
        "batch_size": common.pick(scale, tiny=32, quick=128, paper=128),
        "steps": common.pick(scale, tiny=20, quick=600, paper=PAPER_MLP_STEPS),
        "max_train_samples": common.pick(scale, tiny=256, quick=None, paper=None),
        # which runs carry the tracker: ρ values (for every noise kind) and seeds
        "track_rhos": common.pick(scale, tiny=[1.0], quick=[0.0, 0.5, 1.0], paper=grid(0.1)),
        "track_seeds": common.pick(scale, tiny=[0], quick=[0], paper=[0, 1, 2]),
        "track_every": common.pick(scale, tiny=5, quick=10, paper=10),
        "eval_test": scale != "tiny",
    }


# ---------------------------------------------------------------------------------------
# helpers shared with fig7_label_corruption
# ---------------------------------------------------------------------------------------


def integrals(record_path, total_time: float) -> dict:
    """∫μ_Z dt, ∫κ_Z dt and ∫λ_Z² dt of a (possibly sub-sampled) record.

    Each tracked row stands for the steps up to the next tracked row (left Riemann sum,
    the Itô convention of the discretisation); the last row for the steps up to
    ``total_time``.

    Args:
        record_path: the SQLite record of the run.
        total_time: T = steps · η.

    Returns:
        dict with ``int_mu_Z``, ``int_kappa_Z``, ``int_lambda_sq_Z``, ``tracked_steps``
        and the record's K trajectory as ``t`` / ``K`` lists.
    """
    import numpy as np

    from sdelip.record import load_record

    rec = load_record(record_path)
    t = rec["t"].to_numpy(float)
    dt = np.diff(np.append(t, total_time))

    def integrate(col):
        v = rec[col].to_numpy(float)
        ok = np.isfinite(v)
        return float((v[ok] * dt[ok]).sum())

    return {"int_mu_Z": integrate("drift_Z"), "int_kappa_Z": integrate("noise_curvature_Z"),
            "int_lambda_sq_Z": integrate("diffusion_sq_Z"), "tracked_steps": int(len(rec)),
            "t": t.tolist(), "K": rec["K"].to_numpy(float).tolist()}


def tracked_columns(ints: dict) -> dict:
    """Run-table columns of a tracked run: its integrals and the SDE's log(K_end/K0).

    ``log_ratio_sde`` = ∫(μ_Z + κ_Z − ½λ_Z²) is what the Itô SDE says log(K_end/K0) is, up to
    the noise ∫λ_Z dW and the sub-sampling of the record: compare it with ``log_ratio``.
    """
    return {"int_mu_Z": ints["int_mu_Z"], "int_kappa_Z": ints["int_kappa_Z"],
            "log_ratio_sde": ints["int_mu_Z"] + ints["int_kappa_Z"] - 0.5 * ints["int_lambda_sq_Z"]}


def run_task(cfg: dict, regularizer: dict, seed: int, track: bool, args, name: str):
    """The sweep task of one MLP run with the sweep's settings (record only when tracked).

    Args:
        cfg: :func:`settings` output (lr, batch_size, steps, ...).
        regularizer: ``RegularizerConfig`` fields as a dict.
        seed: used as both the initialisation and the sampling seed.
        track: attach the tracker (and write a record).
        args: parsed command line (data root, download, device).
        name: the task's name.

    Returns:
        a :class:`sdelip.workbench.sweep.Task` running :func:`common.train_task`.
    """
    from sdelip.workbench.sweep import Task

    return Task(name=name, fn=common.train_task, config={"train": dict(
        model="mlp", dataset="mnist", data_root=args.data_root, download=args.download,
        lr=cfg["lr"], batch_size=cfg["batch_size"], steps=cfg["steps"], init_seed=seed, sampling_seed=seed,
        regularizer=regularizer, track=track, track_every=cfg["track_every"],
        max_train_samples=cfg["max_train_samples"], device=args.device, eval_test=cfg["eval_test"])},
        gpus=common.task_gpus(args))


def run_row(res, track: bool, total_time: float) -> tuple[dict, dict | None]:
    """The run-table columns of a finished run, and its tracked integrals (None untracked)."""
    v = res.value
    row = {"K0": v["K_initial"], "K_end": v["K_final"], "log_ratio": math.log(v["K_final"] / v["K_initial"]),
           "train_acc": v["train_accuracy"],
           "test_acc": v["test_accuracy"] if v["test_accuracy"] is not None else float("nan"),
           "tracked": track, "seconds": res.seconds}
    if not track:
        return row, None
    ints = integrals(common.record_path(res), total_time)
    row.update(tracked_columns(ints))
    return row, ints


def verdict(rho_s: float) -> str:
    """The verdict for a Spearman coefficient that the paper's claim says is +1."""
    if not math.isfinite(rho_s):
        return "undetermined"
    if rho_s >= HELD:
        return "held"
    if rho_s >= HELD_WEAKLY:
        return "held weakly"
    return "did not hold"


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0)


def legend(ax, fontsize: int = 7) -> None:
    """A legend when the axes has labelled artists (no warning otherwise)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def data_statement(values) -> str:
    """'Data: <name> — <source>' for the distinct datasets of a list of :func:`common.train_task` values."""
    import re

    seen = dict.fromkeys(f"{v['data']} — {re.sub(r'; labels uniformly corrupted[^;]*', '', v['data_source'])}"
                         for v in values)
    return "Data: " + " | ".join(seen)


# ---------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------


@attrs.frozen
class Job:
    """One run of the sweep.

    Attributes:
        noise: the noise kind, ``"none"`` for the noise-free run (ρ = 1).
        rho: the gradient's weight ρ.
        seed: the initialisation and sampling seed.
        tracked: whether the tracker records the run.
    """

    noise: str
    rho: float
    seed: int
    tracked: bool

    @property
    def name(self) -> str:
        """The run's task name (:func:`task_name`)."""
        return task_name(self.noise, self.rho, self.seed)


@attrs.frozen
class SweepRuns:
    """The finished sweep as the tables read it (:func:`collect`; also fig7's).

    Attributes:
        cfg: the scale's settings (:func:`settings`).
        runs: one row per run, in job order (the ``runs`` table).
        values: every run's task value (:func:`common.train_task`), in job order.
        tracked: the tracked runs' integrals (:func:`integrals`), keyed by the run's varying
            settings (``(noise, ρ, seed)`` here, ``(ε, seed)`` in fig7).
    """

    cfg: dict
    runs: list
    values: list
    tracked: dict


def jobs(cfg: dict) -> list[Job]:
    """Every run; ρ = 1 is one noise-free run shared by the noise kinds."""
    pairs = [("none", 1.0)] + [(noise, rho) for noise in cfg["noises"] for rho in cfg["rhos"] if rho < 1.0]
    return [Job(noise, rho, seed, rho in cfg["track_rhos"] and seed in cfg["track_seeds"])
            for noise, rho in pairs for seed in cfg["seeds"]]


def task_name(noise: str, rho: float, seed: int) -> str:
    """The task's name of a run."""
    return f"{noise}/rho={rho:g}/seed={seed}"


def tasks(args) -> list:
    """One MLP run per (noise, ρ, seed)."""
    cfg = settings(args.scale)
    return [run_task(cfg, {"noisy_gradient_rho": job.rho,
                           "noisy_gradient_noise": job.noise if job.noise != "none" else "zero"},
                     job.seed, job.tracked, args, job.name)
            for job in jobs(cfg)]


def collect(args, results: dict) -> SweepRuns:
    """The per-run rows and the tracked integrals of the finished sweep."""
    cfg = settings(args.scale)
    runs, values, tracked = [], [], {}
    for job in jobs(cfg):
        res = results[job.name]
        values.append(res.value)
        row, ints = run_row(res, job.tracked, cfg["steps"] * cfg["lr"])
        if ints is not None:
            tracked[(job.noise, job.rho, job.seed)] = ints
        runs.append({"noise": job.noise, "rho": job.rho, "seed": job.seed, **row})
    return SweepRuns(cfg=cfg, runs=runs, values=values, tracked=tracked)


def random_walk_K(model, cfg: dict, noise: str) -> float:
    """K at the end of a ρ = 0 run predicted from random-matrix theory alone.

    With ρ = 0 the update is pure noise, θ(T) = θ(0) − η Σ_k n_k: iid entries of variance
    s² + η²·steps·Var(n), with s² = 1/(3n) of PyTorch's default init, so (Sec 8.2)
    K(T) ≈ Π_ℓ √(s_ℓ² + η²·steps·Var(n)) (√m_ℓ + √n_ℓ).
    """
    from sdelip.rules.inventory import tracked_layers
    from sdelip.workbench.regularizers import NOISE_KINDS

    var = cfg["lr"] ** 2 * cfg["steps"] * NOISE_KINDS[noise]
    return math.prod(math.sqrt(1.0 / (3.0 * n) + var) * (math.sqrt(m) + math.sqrt(n))
                     for m, n in (layer.shape for layer in tracked_layers(model)))


def mlp(value: dict):
    """An MLP with the layer sizes of a run (only its layer shapes are used)."""
    from sdelip.workbench.models import MLP

    return MLP(value["model_sizes"])


def summarise(sweep: SweepRuns) -> tuple[list[dict], list[dict]]:
    """Per-(noise, ρ) summary rows with the Eq. 26 prediction, and per-noise monotonicity rows."""
    cfg, runs = sweep.cfg, sweep.runs
    clean = [r for r in runs if r["noise"] == "none"]
    base = [r for r in clean if r["tracked"]]
    I_mu, I_kappa, I_mu_cal = None, None, None
    if base:
        I_mu = mean_sd([r["int_mu_Z"] for r in base])[0]
        I_kappa = mean_sd([r["int_kappa_Z"] for r in base])[0]
        # calibrated: the μ integral that makes Eq. 26 exact at ρ = 1 (observed mean total minus tracked ∫κ_Z);
        # removes the sampling error of the per-step mini-batch estimate of μ_Z on a sub-sampled record
        I_mu_cal = mean_sd([r["log_ratio"] for r in clean])[0] - I_kappa
    rows, mono = [], []
    for noise in cfg["noises"]:
        per_rho = []
        for rho in cfg["rhos"]:
            sel = clean if rho == 1.0 else [r for r in runs if r["noise"] == noise and r["rho"] == rho]
            K0, _ = mean_sd([r["K0"] for r in sel])
            K_end, K_sd = mean_sd([r["K_end"] for r in sel])
            lr_mean, lr_sd = mean_sd([r["log_ratio"] for r in sel])
            row = {"noise": noise, "rho": rho, "seeds": len(sel), "K0": K0, "K_end": K_end, "K_end_sd": K_sd,
                   "log_K_end_over_K0": lr_mean, "log_ratio_sd": lr_sd,
                   "train_acc": mean_sd([r["train_acc"] for r in sel])[0],
                   "test_acc": mean_sd([r["test_acc"] for r in sel])[0]}
            if I_mu is not None:
                row["K_pred_eq26"] = K0 * math.exp(math.sqrt(rho) * I_mu + rho * I_kappa)
                row["K_pred_eq26_cal"] = K0 * math.exp(math.sqrt(rho) * I_mu_cal + rho * I_kappa)
            tr = [r for r in sel if r["tracked"]]
            row["int_mu_Z"] = mean_sd([r["int_mu_Z"] for r in tr])[0] if tr else float("nan")
            row["int_kappa_Z"] = mean_sd([r["int_kappa_Z"] for r in tr])[0] if tr else float("nan")
            if I_mu is not None:  # what Eq. 26 says the tracked integrals of this ρ should be
                row["sqrt_rho_int_mu_Z_1"] = math.sqrt(rho) * I_mu
                row["rho_int_kappa_Z_1"] = rho * I_kappa
            rows.append(row)
            per_rho.append(row)
        rhos = [r["rho"] for r in per_rho]
        K = [r["K_end"] for r in per_rho]
        rho_s = fits.spearman(rhos, K)
        violations = sum(1 for a, b in zip(K, K[1:]) if b < a)
        m = {"noise": noise, "spearman_rho_vs_K_end": rho_s, "adjacent_decreases": violations,
             "K_end_at_rho0": K[0], "K_end_at_rho1": K[-1], "verdict": verdict(rho_s)}
        m["K_rho0_random_walk"] = random_walk_K(mlp(sweep.values[0]), cfg, noise)
        if I_mu is not None:  # RMS error of log K_end against Eq. 26
            for key in ("eq26", "eq26_cal"):
                m[f"rms_log_{key}"] = math.sqrt(sum((math.log(r["K_end"]) - math.log(r[f"K_pred_{key}"])) ** 2
                                                    for r in per_rho) / len(per_rho))
        mono.append(m)
    return rows, mono


def plot(rows, sweep: SweepRuns, out: Path) -> list[Path]:
    """K_end against ρ per noise kind (with Eq. 26), tracked integrals, and tracked K(t)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    from sdelip.analysis.plotting import save_figure

    cfg = sweep.cfg
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for k, noise in enumerate(cfg["noises"]):
        sel = [r for r in rows if r["noise"] == noise]
        ax.errorbar([r["rho"] for r in sel], [r["K_end"] for r in sel], yerr=[r["K_end_sd"] for r in sel],
                    fmt="o-", color=f"C{k}", ms=4, label=f"{noise} noise")
    sel = [r for r in rows if r["noise"] == cfg["noises"][0]]
    if "K_pred_eq26" in sel[0]:
        ax.plot([r["rho"] for r in sel], [r["K_pred_eq26"] for r in sel], "k--", label="Eq. 26 from ρ=1 integrals")
        ax.plot([r["rho"] for r in sel], [r["K_pred_eq26_cal"] for r in sel], "k-.", lw=1,
                label="Eq. 26, ∫μ_Z calibrated at ρ=1")
    ax.axhline(sel[0]["K0"], color="gray", ls=":", label="K(0)")
    ax.set_yscale("log")
    ax.set_xlabel("ρ (gradient weight √ρ, noise weight √(1−ρ))")
    ax.set_ylabel("K at the end (mean ± sd over seeds)")
    ax.set_title(f"MLP, η={cfg['lr']:g}, M={cfg['batch_size']}, {cfg['steps']} steps")
    ax.legend(fontsize=8)

    ax = axes[1]
    base = [v for k, v in sweep.tracked.items() if k[0] == "none"]
    drew = False
    for k, noise in enumerate(cfg["noises"]):
        pts = sorted(((key[1], v) for key, v in sweep.tracked.items() if key[0] in (noise, "none")),
                     key=lambda kv: kv[0])
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1]["int_mu_Z"] for p in pts], "o-", color=f"C{k}", ms=4,
                label=f"∫μ_Z ({noise})")
        ax.plot([p[0] for p in pts], [p[1]["int_kappa_Z"] for p in pts], "s:", color=f"C{k}", ms=4,
                label=f"∫κ_Z ({noise})")
        drew = True
    if base:
        import numpy as np

        r = np.linspace(0, 1, 101)
        I_mu = float(np.mean([b["int_mu_Z"] for b in base]))
        I_kappa = float(np.mean([b["int_kappa_Z"] for b in base]))
        ax.plot(r, np.sqrt(r) * I_mu, "k-", lw=1, label="√ρ·∫μ_Z(ρ=1)")
        ax.plot(r, r * I_kappa, "k--", lw=1, label="ρ·∫κ_Z(ρ=1)")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("ρ")
    ax.set_ylabel("tracked integral over the run")
    ax.set_title("Tracked ∫μ_Z, ∫κ_Z (incl. injected-noise κ)" if drew else "no tracked runs")
    legend(ax)

    ax = axes[2]
    for k, noise in enumerate(("none",) + tuple(cfg["noises"])):
        for (n, rho, seed), v in sorted(sweep.tracked.items()):
            if n == noise:
                ax.plot(v["t"], v["K"], color=f"C{k - 1}" if noise != "none" else "k",
                        ls="-" if rho == 0 else "--", lw=1.2, label=f"{noise} ρ={rho:g}")
    ax.set_yscale("log")
    ax.set_xlabel("t = step · η")
    ax.set_ylabel("K(t) (tracked runs)")
    ax.set_title("K(t) of the tracked runs")
    legend(ax)
    fig.tight_layout()
    return [Path(save_figure(fig, out / "fig6_noisy_gradient.png"))]


def reduce(args, results: dict, out: Path) -> dict:
    """The summary, monotonicity and run tables, the figure and ``summary.json`` from the finished runs."""
    sweep = collect(args, results)
    seconds = sum(r.seconds for r in results.values())
    cfg = sweep.cfg
    rows, mono = summarise(sweep)
    notes = [
        f"Scale: {args.scale}; MLP {tuple(sweep.values[0]['model_sizes'])}, plain SGD, η = {cfg['lr']:g}, "
        f"M = {cfg['batch_size']}, {cfg['steps']} steps, seeds {cfg['seeds']} (init seed = sampling seed); "
        f"{seconds:.0f} s of runs in all.",
        data_statement(sweep.values),
        "ρ = 1 is one run (no noise) shared by the three noise kinds. K = Π σ1 of the three weight matrices.",
        "Tracked runs (ρ ∈ %s, seeds %s, every %d steps): ∫μ_Z and ∫κ_Z are left Riemann sums over the record; "
        "∫κ_Z includes the injected-noise variance (1−ρ)·Var(n)."
        % (cfg["track_rhos"], cfg["track_seeds"], cfg["track_every"]),
        "K_pred_eq26 = K0·exp(√ρ·∫μ_Z + ρ·∫κ_Z) with the integrals of the tracked ρ = 1 run (Eq. 26, which "
        "neglects the curvature term of the injected noise). K_pred_eq26_cal uses instead ∫μ_Z = the ρ = 1 "
        "runs' mean observed log(K_end/K0) − ∫κ_Z (the per-step μ_Z is a one-mini-batch estimate, so a sub-sampled "
        "record gives a noisy ∫μ_Z; runs.csv compares log_ratio_sde = ∫(μ_Z + κ_Z − ½λ_Z²) with log_ratio).",
    ]
    for m in mono:
        notes.append(f"{m['noise']} noise: Spearman(ρ, K_end) = {m['spearman_rho_vs_K_end']:+.3f} "
                     f"({m['adjacent_decreases']} adjacent decreases); K_end {m['K_end_at_rho0']:.4g} at ρ = 0 vs "
                     f"{m['K_end_at_rho1']:.4g} at ρ = 1 → paper's claim (K falls as ρ falls): {m['verdict']} "
                     f"(held ≥ {HELD}, weakly ≥ {HELD_WEAKLY})"
                     + (f"; Eq. 26 rms error of log K_end: {m['rms_log_eq26']:.3f} (calibrated "
                        f"{m['rms_log_eq26_cal']:.3f})" if "rms_log_eq26" in m else "")
                     + f"; pure-noise random-walk K at ρ = 0 (Sec 8.2 formula): {m['K_rho0_random_walk']:.4g}.")
    reporting.write_table(sweep.runs, out, stem="runs", title="Fig 6: every run")
    reporting.write_table(mono, out, stem="monotonicity", title="Fig 6: monotonicity of K_end in ρ")
    csv_path, md_path = reporting.write_table(rows, out, stem="summary",
                                           title="Fig 6 / Sec 8.4: K at the end against ρ", notes=notes)
    figs = plot(rows, sweep, out)
    summary = {"scale": args.scale, "seconds": seconds, "data": data_statement(sweep.values),
               "monotonicity": mono, "settings": {k: v for k, v in cfg.items()}}
    reporting.write_json(summary, out / "summary.json")
    print(md_path.read_text())
    return {"summary": summary, "rows": rows, "csv": csv_path, "md": md_path, "figures": figs}


def main(argv=None) -> dict:
    """Run the sweep (see :func:`common.run_experiment`) and write the figure, the tables and ``summary.json``."""
    return common.run_experiment(NAME, __doc__.splitlines()[0], tasks, reduce, argv)


if __name__ == "__main__":
    main()
