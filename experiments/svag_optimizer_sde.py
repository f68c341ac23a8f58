"""SVAG check of OptimizerSDE for momentum SGD (issue 26; Li, Malladi & Arora 2021).

SVAG with ℓ: each step's gradient is g = r1 ĝ_B1 + r2 ĝ_B2 of two independent batches of M
distinct samples, r1,2 = (1 ± √(2ℓ − 1))/2 (mean ∇L, noise covariance ℓ times one batch's),
and the run makes ℓ steps per step of the original run. For heavy-ball momentum
b ← βb + (1 − d)g, θ ← θ − ηb the scaling that keeps the SDE of docs/theory.md §16 fixed on
the clock t = kη (Li, Tai & E: 1 − β ∝ η) is

    η → η/ℓ,   1 − β → (1 − β)/ℓ,   1 − d → (1 − d)/ℓ

(db = ((β − 1)b + (1 − d)ĝ)/η dt − ((1 − d)/η)G dB is then unchanged: drift and noise per unit
time are both invariant). ℓ = 1 is the real run. As ℓ → ∞ the runs converge weakly to the SDE,
so the distance of mean K and Var[K] to the SDE's must shrink as ℓ grows, up to the SDE's own
discretisation: the reference is OptimizerSDE integrated by Euler at dt = η/q (``--sde-div q``),
with the gradient evaluated at θ − h·b, h = η (``lookahead=None``, the optimizer's) or h = dt
(``--lookahead-dt``: then the Euler scheme at dt = η/ℓ is SVAG's ℓ-th process with a Gaussian
batch, and ℓ → ∞ is dt = h → 0).

The buffer starts as in PyTorch and as ``OptimizerSDE.initial_state``: b_1 = one ordinary batch
gradient at θ_0 (variance Σ, whatever ℓ; PyTorch's first step would give the SVAG gradient, whose
variance ℓΣ has no limit).

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/svag_optimizer_sde.py --steps 31
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from ensemble_optimizer_sde import bootstrap_mean_diff, bootstrap_ratio, data, lipschitz
from sdelip.sde import DriftOptions, NoiseOptions, OptimizerSDE
from sdelip.workbench.models import MLP

LR, BETA = 0.01, 0.9


def svag_weights(ell):
    """r1, r2 = (1 ± √(2ℓ − 1))/2: r1 + r2 = 1 (the mean stays ∇L), r1² + r2² = ℓ (ℓ times one batch's noise)."""
    s = math.sqrt(2 * ell - 1)
    return (1 + s) / 2, (1 - s) / 2


def svag_runs(model0, X, Y, ell, n, steps, M, sde):
    """K after each original step (every ℓ SVAG steps) of n SVAG momentum runs (steps + 1, n)."""
    lr, mu, damp_keep = LR / ell, (1 - BETA) / ell, 1.0 / ell
    r1, r2 = svag_weights(ell)
    Ks = torch.empty(steps + 1, n)
    for r in range(n):
        model = copy.deepcopy(model0)
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(5000 + 100 * ell + r)
        th = [sde.layout.flatten_model(model)]
        buf = None
        for k in range(ell * steps):
            if buf is None or ell == 1:
                idx = torch.randperm(len(X), generator=gen)[:M]
                w = torch.full((M,), 1.0 / M)
            else:
                idx = torch.cat([torch.randperm(len(X), generator=gen)[:M], torch.randperm(len(X), generator=gen)[:M]])
                w = torch.cat([torch.full((M,), r1 / M), torch.full((M,), r2 / M)])
            model.zero_grad()
            (nn.functional.cross_entropy(model(X[idx]), Y[idx], reduction="none") * w).sum().backward()
            with torch.no_grad():
                if buf is None:
                    buf = [p.grad.clone() for p in params]
                else:
                    for b, p in zip(buf, params):
                        b.mul_(1 - mu).add_(p.grad, alpha=damp_keep)
                for b, p in zip(buf, params):
                    p.sub_(lr * b)
            if (k + 1) % ell == 0:
                th.append(sde.layout.flatten_model(model))
        Ks[:, r] = lipschitz(torch.stack(th), sde)
    return Ks


def sde_runs(model0, X, Y, n, steps, M, B, q, seed, lookahead_dt=False):
    """OptimizerSDE (heavy ball, η = LR, β = BETA) by Euler at dt = η/q; K at every t = kη (steps + 1, n)."""
    model = copy.deepcopy(model0)
    dt = LR / q
    sde = OptimizerSDE(model, (X, Y), torch.optim.SGD(model.parameters(), lr=LR, momentum=BETA),
                       noise_batch_size=M, drift=DriftOptions(source="batch", batch_size=B, dt=dt),
                       noise=NoiseOptions(coupling="shared"), seed=7, lookahead=dt if lookahead_dt else None)
    y = sde.initial_state(n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    Ks = torch.empty(steps + 1, n)
    Ks[0] = lipschitz(y, sde)
    for i in range(steps * q):
        v = torch.randn(n, sde.brownian_size, generator=gen) * math.sqrt(dt)
        f, gv = sde.f_and_g_prod(i * dt, y, v)
        y = y + dt * f + gv
        if (i + 1) % q == 0:
            Ks[(i + 1) // q] = lipschitz(y, sde)
    return Ks, sde


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=31, help="original steps (31 = one epoch)")
    p.add_argument("--ells", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--n-real", type=int, default=16)
    p.add_argument("--n-sde", type=int, default=16)
    p.add_argument("--sde-div", type=int, nargs="+", default=[1], help="Euler steps per η of the reference SDE")
    p.add_argument("--lookahead-dt", action="store_true", help="h = dt for the SDE runs of this call")
    p.add_argument("--reuse", action="store_true", help="keep the runs and SDE references in <out>/svag_momentum.pt")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--drift-batch", type=int, default=256)
    p.add_argument("--out", default="docs/results/optimizer_sde")
    a = p.parse_args(argv)
    out = Path(a.out)
    X, Y = data()
    torch.manual_seed(0)
    model0 = MLP()
    res, times = {}, {}
    if a.reuse:
        old = torch.load(out / "svag_momentum.pt")
        res, times = old["K"], old["times"]
    for q in a.sde_div:
        name = f"SDE dt=η/{q}, h={'dt' if a.lookahead_dt else 'η'}"
        t0 = time.time()
        res[name], sde = sde_runs(model0, X, Y, a.n_sde, a.steps, a.batch, a.drift_batch, q, seed=11,
                                  lookahead_dt=a.lookahead_dt)
        times[name] = time.time() - t0
        print(f"{name}: {times[name]:.0f} s", flush=True)
    for ell in a.ells:
        if f"ℓ={ell}" in res:
            continue
        t0 = time.time()
        res[f"ℓ={ell}"] = svag_runs(model0, X, Y, ell, a.n_real, a.steps, a.batch, sde)
        times[f"ℓ={ell}"] = time.time() - t0
        print(f"ℓ = {ell}: {times[f'ℓ={ell}']:.0f} s", flush=True)
    torch.save({"K": res, "times": times}, out / "svag_momentum.pt")
    half = (len(X) // a.batch) / 2
    marks = sorted({min(a.steps, round(half * i)) for i in range(1, 1 + int(a.steps // half))})
    with open(out / "svag_momentum.md", "w") as fh:
        fh.write(f"SVAG, momentum SGD (η = {LR}, β = {BETA}), M = {a.batch}: {a.n_real} runs per ℓ, {a.n_sde} SDE "
                 f"trajectories (B = {a.drift_batch}); runtimes " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
                 + "\n\n")
        for refname in [k for k in res if k.startswith("SDE")]:
            ref = res[refname]
            fh.write(f"Against the {refname}: mean K relative difference (SDE ÷ runs − 1) and Var[K] ratio "
                     "runs ÷ SDE, bootstrap 95 % intervals\n\n")
            fh.write("| ℓ | step | mean K runs | mean K SDE | rel. diff (95 % CI) | Var K runs | Var K SDE | ratio (95 % CI) |\n")
            fh.write("|---|---|---|---|---|---|---|---|\n")
            for ell in sorted(int(k[2:]) for k in res if k.startswith("ℓ=")):
                K = res[f"ℓ={ell}"]
                for k in marks:
                    lo, hi = bootstrap_mean_diff(K[k], ref[k])
                    vlo, vhi = bootstrap_ratio(K[k], ref[k])
                    fh.write(f"| {ell} | {k} | {float(K[k].mean()):.4f} | {float(ref[k].mean()):.4f} | "
                             f"{100 * float(ref[k].mean() / K[k].mean() - 1):+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
                             f"{float(K[k].var()):.3g} | {float(ref[k].var()):.3g} | "
                             f"{float(K[k].var() / ref[k].var()):.2f} [{vlo:.2f}, {vhi:.2f}] |\n")
            fh.write("\n")
    print(open(out / "svag_momentum.md").read(), flush=True)


if __name__ == "__main__":
    main()
