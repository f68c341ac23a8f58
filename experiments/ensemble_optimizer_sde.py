"""Ensemble validation of OptimizerSDE (issue 26): real momentum SGD, Adam and RMSprop against their SDEs.

From one initialisation of the paper's MLP (784-512-256-10) on the bundled digits
(``mnist-embedded``, N = 4000, M = 128, 31 steps per epoch), per optimizer:

- ``n_real`` real runs that differ only in their sampling seed, iid mini-batches (M distinct
  samples per step, independent across steps: the sampling the SDE models);
- ``n_sde`` Euler–Maruyama trajectories of ``OptimizerSDE`` at dt = η (drift on an independent
  batch of B samples per trajectory and step, the diffusion compensated as in ParameterSDE;
  noise coupling ``shared``: one mini-batch moves every layer, as in a real step).

K = Π σ1(θ^(ℓ)) at every step; at the half-epoch marks the table gives mean K (relative
difference), Var[K] of both and the ratio real ÷ SDE with a bootstrap 95 % interval
(resampling runs and trajectories). Writes ``<out>/<optimizer>.{csv,md}`` and ``<out>/<optimizer>.png``.

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/ensemble_optimizer_sde.py --steps 62
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import time
from pathlib import Path

import torch
from torch import nn

from sdelip.sde import DriftOptions, NoiseOptions, OptimizerSDE, SecondMomentOptions
from sdelip.workbench.data import load_dataset
from sdelip.workbench.models import MLP

OPTIMIZERS = {
    "momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


def data():
    info = load_dataset("mnist-embedded")
    ds = info.dataset if hasattr(info, "dataset") else info.train
    X = torch.stack([ds[i][0] for i in range(len(ds))]).reshape(len(ds), -1).float()
    Y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    return X, Y


def lipschitz(thetas, sde):
    """Π σ1(θ^(ℓ)) from the top eigenvalue of the smaller Gram matrix (faster than an SVD on CPU)."""
    out = 1.0
    for W in sde.weight_matrices(thetas):
        G = W @ W.transpose(-1, -2) if W.shape[-2] <= W.shape[-1] else W.transpose(-1, -2) @ W
        out = out * torch.linalg.eigvalsh(G.double())[..., -1].clamp(min=0).sqrt().float()
    return out


def real_runs(model0, X, Y, make_opt, n, steps, M, sde):
    Ks = torch.empty(steps + 1, n)
    for r in range(n):
        model = copy.deepcopy(model0)
        opt = make_opt(model.parameters())
        gen = torch.Generator().manual_seed(1000 + r)
        th = [sde.layout.flatten_model(model)]
        for _ in range(steps):
            idx = torch.randperm(len(X), generator=gen)[:M]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
            th.append(sde.layout.flatten_model(model))
        Ks[:, r] = lipschitz(torch.stack(th), sde)
    return Ks


def sde_runs(sde, n, steps, seed):
    y = sde.initial_state(n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    Ks = torch.empty(steps + 1, n)
    start = 0
    if sde.family == "rmsprop" and sde.second_moment.first_step == "drawn":  # y is the state at t = η
        Ks[0] = lipschitz(sde.layout.flatten_model(sde.model).unsqueeze(0), sde).expand(n)
        start = 1
    Ks[start] = lipschitz(y, sde)
    for k in range(start, steps):
        v = torch.randn(n, sde.brownian_size, generator=gen) * math.sqrt(sde.lr)
        f, gv = sde.f_and_g_prod(k * sde.lr, y, v)
        y = y + sde.lr * f + gv
        Ks[k + 1] = lipschitz(y, sde)
        if k % 5 == 0:
            print(f"  sde step {k}", flush=True)
    return Ks


def bootstrap_ratio(a, b, n_boot=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ia = torch.randint(0, len(a), (n_boot, len(a)), generator=g)
    ib = torch.randint(0, len(b), (n_boot, len(b)), generator=g)
    r = a[ia].var(1) / b[ib].var(1)
    return float(r.quantile(0.025)), float(r.quantile(0.975))


def bootstrap_mean_diff(a, b, n_boot=2000, seed=0):
    """95 % interval of mean(b)/mean(a) − 1 (b the SDE, a the real runs), resampling both."""
    g = torch.Generator().manual_seed(seed)
    ia = torch.randint(0, len(a), (n_boot, len(a)), generator=g)
    ib = torch.randint(0, len(b), (n_boot, len(b)), generator=g)
    r = b[ib].mean(1) / a[ia].mean(1) - 1
    return float(r.quantile(0.025)), float(r.quantile(0.975))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=62)
    p.add_argument("--n-real", type=int, default=16)
    p.add_argument("--n-sde", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--drift-batch", type=int, default=512)
    p.add_argument("--optimizers", nargs="+", default=["momentum", "adam"], choices=list(OPTIMIZERS))
    p.add_argument("--rmsprop-first-step", default="expected", choices=["expected", "drawn"],
                   help="SecondMomentOptions.first_step of the RMSprop SDE (files rmsprop_drawn.* with 'drawn')")
    p.add_argument("--out", default="docs/results/optimizer_sde")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    X, Y = data()
    torch.manual_seed(0)
    model0 = MLP()
    half = (len(X) // a.batch) / 2
    marks = sorted({min(a.steps, round(half * i)) for i in range(1, 1 + int(a.steps // half))})
    for name in a.optimizers:
        t0 = time.time()
        model = copy.deepcopy(model0)
        second = (SecondMomentOptions(first_step=a.rmsprop_first_step) if name == "rmsprop" else None)
        sde = OptimizerSDE(model, (X, Y), OPTIMIZERS[name](model.parameters()), noise_batch_size=a.batch,
                           drift=DriftOptions(source="batch", batch_size=a.drift_batch),
                           noise=NoiseOptions(coupling="shared"), seed=7, second_moment=second)
        print(name, 'real runs', flush=True)
        Kr = real_runs(model0, X, Y, OPTIMIZERS[name], a.n_real, a.steps, a.batch, sde)
        if name == "rmsprop" and a.rmsprop_first_step == "drawn":
            name = "rmsprop_drawn"  # the output files
        t1 = time.time()
        Ks = sde_runs(sde, a.n_sde, a.steps, seed=11)
        t2 = time.time()
        rows = []
        for k in marks:
            lo, hi = bootstrap_ratio(Kr[k], Ks[k])
            mlo, mhi = bootstrap_mean_diff(Kr[k], Ks[k])
            rows.append(dict(step=k, epoch=round(k / (2 * half), 2), K_real=float(Kr[k].mean()),
                             K_sde=float(Ks[k].mean()),
                             mean_rel_diff=float(Ks[k].mean() / Kr[k].mean() - 1), mean_lo=mlo, mean_hi=mhi,
                             var_real=float(Kr[k].var()), var_sde=float(Ks[k].var()),
                             var_ratio=float(Kr[k].var() / Ks[k].var()), ci_lo=lo, ci_hi=hi))
        with open(out / f"{name}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        with open(out / f"{name}.md", "w") as fh:
            fh.write(f"{name}: {a.n_real} real runs, {a.n_sde} SDE trajectories, M = {a.batch}, "
                     f"B = {a.drift_batch}, {a.steps} steps (real {t1 - t0:.0f} s, SDE {t2 - t1:.0f} s)\n\n")
            fh.write("| step | epoch | mean K real | mean K SDE | rel. diff (95 % CI) | Var K real | Var K SDE | ratio real÷SDE | 95 % CI |\n")
            fh.write("|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                fh.write(f"| {r['step']} | {r['epoch']} | {r['K_real']:.4f} | {r['K_sde']:.4f} | "
                         f"{100 * r['mean_rel_diff']:+.2f} % [{100 * r['mean_lo']:+.2f}, {100 * r['mean_hi']:+.2f}] | {r['var_real']:.3g} | {r['var_sde']:.3g} | "
                         f"{r['var_ratio']:.2f} | [{r['ci_lo']:.2f}, {r['ci_hi']:.2f}] |\n")
        torch.save({"K_real": Kr, "K_sde": Ks}, out / f"{name}.pt")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
            ts = range(a.steps + 1)
            ax[0].plot(ts, Kr.mean(1), label="real"), ax[0].plot(ts, Ks.mean(1), "--", label="SDE")
            ax[0].set(xlabel="step", ylabel="mean K", title=name)
            ax[1].plot(ts, Kr.var(1), label="real"), ax[1].plot(ts, Ks.var(1), "--", label="SDE")
            ax[1].set(xlabel="step", ylabel="Var[K]")
            ax[1].legend()
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=110)
        except ImportError:
            pass
        print(open(out / f"{name}.md").read(), flush=True)


if __name__ == "__main__":
    main()
