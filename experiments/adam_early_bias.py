"""Adam's early-phase bias against its SDE (issue 26): does the noise of v cause it?

The SDE of Adam (docs/theory.md §16) moves v with its expectation only: v_{k+1} − v_k =
(1 − β2)(ĝ² + diag Σ̂ − v_k), and starts at v_1 = (1 − β2)E[ĝ_0²]; a real run's v is an EMA of
squared *noisy* batch gradients. This script measures, on the setting of
``ensemble_optimizer_sde.py`` (the paper's MLP on the bundled digits, M = 128, Adam η = 10⁻³),
mean K per step of

- ``real``: real Adam (written out; checked against ``torch.optim.Adam`` on run 0);
- ``real, E[v]``: the same runs (same batches, paired) with v moved by its expectation
  E_B[ĝ_B²] = ∇L² + (N − M)/(M(N − 1))·σ² (σ² the per-sample variance over the training set,
  computed exactly each step) while m keeps the batch gradient — the real dynamics with v as
  the SDE has it;
- ``real, E[v] from step 2``: v_1 from the first batch, E[v] afterwards;
- the SDE with ``SecondMomentOptions()`` (default) and ``(first_step="drawn")``, the same driver
  for both (paired);
- ``Gaussian Adam``: the SDE's Euler step at dt = η with v_{k+1} = β2 v_k + (1 − β2)(ĝ + ξ)², ξ the
  same Gaussian draw that moves m, and v_1 drawn — not an SDE (v's increment is not linear in the
  driver), the real optimizer with the batch replaced by a Gaussian of the same mean and
  covariance: what is left of the gap once v has its noise.

Writes ``<out>/adam_early.{md,pt}``.

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/adam_early_bias.py --steps 31
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from ensemble_optimizer_sde import data, lipschitz, sde_runs
from sdelip.sde import DriftOptions, NoiseOptions, OptimizerSDE, SecondMomentOptions
from sdelip.workbench.models import MLP

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8


def gradient_moments(model, X, Y):
    """Per Linear layer, for its weight and its bias: (θ, ∇L, mean over the N samples of g_i∘g_i), exactly.

    One forward and backward of the whole set; g_i = δ_i x_iᵀ (weight) and δ_i (bias) from the
    layers' inputs and output gradients, so no per-sample gradient is formed.
    """
    N = len(X)
    lin = [m for m in model if isinstance(m, nn.Linear)]
    h, inputs, outs = X.reshape(N, -1), [], []
    for i, layer in enumerate(lin):
        inputs.append(h)
        z = layer(h)
        outs.append(z)
        h = torch.relu(z) if i < len(lin) - 1 else z
    deltas = torch.autograd.grad(nn.functional.cross_entropy(h, Y, reduction="sum"), outs)
    with torch.no_grad():
        return [((layer.weight, d.T @ x / N, (d * d).T @ (x * x) / N), (layer.bias, d.sum(0) / N, (d * d).sum(0) / N))
                for layer, x, d in zip(lin, inputs, deltas)]


def expected_batch_square(model, X, Y, M):
    """E_B[g_B∘g_B] over batches of M distinct samples, exactly: ∇L² + (N − M)/(M(N − 1))·σ² per parameter."""
    N = len(X)
    c = (N - M) / (M * (N - 1))
    return {p: mean * mean + c * (sq - mean * mean)
            for layer in gradient_moments(model, X, Y) for p, mean, sq in layer}


def signal_to_noise(model, X, Y, M):
    """Σ∇L² ÷ Σ Var(ĝ_B) over the weight matrices, and per layer the share of coordinates with ∇L² > Var(ĝ_B)."""
    N = len(X)
    c = (N - M) / (M * (N - 1))
    sig = noise = 0.0
    share = []
    for (_, mean, sq), _bias in gradient_moments(model, X, Y):
        var = c * (sq - mean * mean)
        sig, noise = sig + float((mean * mean).sum()), noise + float(var.sum())
        share.append(float((mean * mean > var).float().mean()))
    return sig / noise, share


def real_runs(model0, X, Y, n, steps, M, sde, v_mode):
    """Adam written out; v_mode ``"batch"`` (real), ``"expected"`` or ``"expected_after_1"``."""
    Ks = torch.empty(steps + 1, n)
    b1, b2 = BETAS
    for r in range(n):
        model = copy.deepcopy(model0)
        params = list(model.parameters())
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        gen = torch.Generator().manual_seed(1000 + r)
        th = [sde.layout.flatten_model(model)]
        for k in range(1, steps + 1):
            idx = torch.randperm(len(X), generator=gen)[:M]
            if v_mode == "batch" or (v_mode == "expected_after_1" and k == 1):
                sq = None
            else:
                sq = expected_batch_square(model, X, Y, M)
            model.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            with torch.no_grad():
                for i, p in enumerate(params):
                    g = p.grad
                    m[i].mul_(b1).add_(g, alpha=1 - b1)
                    v[i].mul_(b2).add_(g * g if sq is None else sq[p], alpha=1 - b2)
                    denom = (v[i] / (1 - b2 ** k)).sqrt() + EPS
                    p.sub_(LR / (1 - b1 ** k) * m[i] / denom)
            th.append(sde.layout.flatten_model(model))
        Ks[:, r] = lipschitz(torch.stack(th), sde)
    return Ks


def gaussian_adam_runs(sde, n, steps, seed):
    """Euler at dt = η of the SDE with v's row replaced by β2 v + (1 − β2)(ĝ + ξ)² (ξ = −G·ΔW/η, the draw of m)."""
    b2 = sde.hp["beta2"]
    y = sde.initial_state(n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    Ks = torch.empty(steps + 1, n)
    Ks[0] = lipschitz(y, sde)
    for k in range(steps):
        w = torch.randn(n, sde.brownian_size, generator=gen) * math.sqrt(sde.lr)
        f, gv = sde.f_and_g_prod(k * sde.lr, y, w)
        c = sde._coefficients(k * sde.lr, y, w)
        g = c.ghat - c.inc.to(y.dtype) / sde.lr
        v_new = b2 * sde.row(y, "exp_avg_sq") + (1 - b2) * g * g
        y = y + sde.lr * f + gv
        sde.row(y, "exp_avg_sq").copy_(v_new)
        Ks[k + 1] = lipschitz(y, sde)
    return Ks


def torch_adam_run(model0, X, Y, steps, M, sde):
    model = copy.deepcopy(model0)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS)
    gen = torch.Generator().manual_seed(1000)
    for _ in range(steps):
        idx = torch.randperm(len(X), generator=gen)[:M]
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
    return sde.layout.flatten_model(model)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=31)
    p.add_argument("--n-real", type=int, default=16)
    p.add_argument("--n-sde", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--drift-batch", type=int, default=256)
    p.add_argument("--reuse-real", action="store_true", help="take the real variants from <out>/adam_early<tag>.pt")
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out (their names)")
    p.add_argument("--tables-only", action="store_true", help="rewrite <out>/adam_early<tag>.md from its .pt")
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--out", default="docs/results/optimizer_sde")
    a = p.parse_args(argv)
    out = Path(a.out)
    X, Y = data()
    torch.manual_seed(0)
    model0 = MLP()
    variants, times = {}, {}

    def sde_for(opts):
        model = copy.deepcopy(model0)
        return OptimizerSDE(model, (X, Y), torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS),
                            noise_batch_size=a.batch, drift=DriftOptions(source="batch", batch_size=a.drift_batch),
                            noise=NoiseOptions(coupling="shared"), seed=7, second_moment=opts)

    sde = sde_for(None)
    snr = [signal_to_noise(model0, X, Y, a.batch)]
    m31 = copy.deepcopy(model0)
    opt31, gen = torch.optim.Adam(m31.parameters(), lr=LR, betas=BETAS, eps=EPS), torch.Generator().manual_seed(1000)
    for _ in range(31):
        idx = torch.randperm(len(X), generator=gen)[:a.batch]
        opt31.zero_grad()
        nn.functional.cross_entropy(m31(X[idx]), Y[idx]).backward()
        opt31.step()
    snr.append(signal_to_noise(m31, X, Y, a.batch))
    header = None
    if a.reuse_real or a.tables_only:  # the variants of an earlier run of this script (same seeds)
        old = torch.load(out / f"adam_early{a.tag}.pt")
        old = old["variants"] if "variants" in old else old
        variants.update({k: v for k, v in old.items() if a.tables_only or k.startswith("real")})
        times.update({k: float("nan") for k in variants})
        if a.tables_only:
            header = open(out / f"adam_early{a.tag}.md").readline()
    check_steps = 0 if a.reuse_real or a.tables_only else 3
    if check_steps:
        mine = real_runs(model0, X, Y, 1, check_steps, a.batch, sde, "batch")
        ref = lipschitz(torch_adam_run(model0, X, Y, check_steps, a.batch, sde).unsqueeze(0), sde)
        print(f"written-out Adam vs torch.optim.Adam after {check_steps} steps: K {float(mine[-1, 0]):.6f} "
              f"vs {float(ref[0]):.6f}", flush=True)
    for name, mode in (("real", "batch"), ("real, E[v]", "expected"), ("real, E[v] from step 2", "expected_after_1")):
        if name in variants or name in a.skip or a.tables_only:
            continue
        t0 = time.time()
        variants[name] = real_runs(model0, X, Y, a.n_real, a.steps, a.batch, sde, mode)
        times[name] = time.time() - t0
        print(name, f"{times[name]:.0f} s", flush=True)
    for name, opts in (("SDE", SecondMomentOptions()), ("SDE, v_1 drawn", SecondMomentOptions(first_step="drawn"))):
        if name in a.skip or a.tables_only:
            continue
        t0 = time.time()
        variants[name] = sde_runs(sde_for(opts), a.n_sde, a.steps, seed=11)
        times[name] = time.time() - t0
        print(name, f"{times[name]:.0f} s", flush=True)
    if not a.tables_only:
        t0 = time.time()
        variants["Gaussian Adam (not an SDE)"] = gaussian_adam_runs(sde_for(SecondMomentOptions(first_step="drawn")),
                                                                    a.n_sde, a.steps, seed=11)
        times["Gaussian Adam (not an SDE)"] = time.time() - t0
        torch.save({"variants": variants, "times": times}, out / f"adam_early{a.tag}.pt")

    half = (len(X) // a.batch) / 2
    marks = [k for k in (1, 2, 4, 8) if k <= a.steps] + [round(half * i) for i in range(1, 1 + int(a.steps // half))]
    g = torch.Generator().manual_seed(0)
    ii = torch.randint(0, a.n_real, (2000, a.n_real), generator=g)

    def compare(ref, K, paired):
        """Mean K relative difference and Var ratio ref ÷ K, each with a bootstrap 95 % interval."""
        if paired:
            i1 = i2 = ii
        else:
            i1 = torch.randint(0, len(ref), (2000, len(ref)), generator=g)
            i2 = torch.randint(0, len(K), (2000, len(K)), generator=g)
        d = K[i2].mean(1) / ref[i1].mean(1) - 1
        r = ref[i1].var(1) / K[i2].var(1)
        q = lambda x: (float(x.quantile(0.025)), float(x.quantile(0.975)))
        return float(K.mean() / ref.mean() - 1), q(d), float(ref.var() / K.var()), q(r)

    with open(out / f"adam_early{a.tag}.md", "w") as fh:
        fh.write(header or (f"Adam η = {LR}, M = {a.batch}, B = {a.drift_batch}: {a.n_real} real runs per variant (the "
                            f"same batches in each), {a.n_sde} trajectories per SDE variant (the same driver); runtimes "
                            + ", ".join(f"{k} {v:.0f} s" for k, v in times.items() if v == v)
                            + (" (real variants from the earlier run)" if a.reuse_real else "") + "\n"))
        fh.write("\n")
        fh.write("Signal against noise, Σ∇L² ÷ Σ Var(ĝ_B) (and per layer the share of coordinates with "
                 "∇L² > Var(ĝ_B)): " + "; ".join(f"{w} {r:.2f} ({', '.join(f'{x:.2f}' for x in sh)})" for w, (r, sh)
                                                   in zip(("at θ_0", "after 31 steps of real run 0"), snr)) + "\n\n")
        fh.write("Mean K and Var[K] per step:\n\n| variant | " + " | ".join(f"step {k}" for k in marks) + " |\n")
        fh.write("|---" * (len(marks) + 1) + "|\n")
        for name, K in variants.items():
            fh.write(f"| {name} | " + " | ".join(f"{float(K[k].mean()):.4f}, Var {float(K[k].var()):.2g}"
                                              for k in marks) + " |\n")
        for refname in ("real", "real, E[v]", "SDE"):
            if refname not in variants:
                continue
            fh.write(f"\nAgainst `{refname}`: mean K relative difference (variant ÷ {refname} − 1) and Var[K] ratio "
                     f"{refname} ÷ variant, bootstrap 95 % intervals (paired — the same runs or the same driver "
                     "resampled — between real variants and between model variants):\n\n| variant | "
                     + " | ".join(f"step {k}" for k in marks) + " |\n")
            fh.write("|---" * (len(marks) + 1) + "|\n")
            for name, K in variants.items():
                if name == refname:
                    continue
                cells = []
                for k in marks:
                    paired = name.startswith("real") == refname.startswith("real")
                    d, (lo, hi), r, (rlo, rhi) = compare(variants[refname][k], K[k], paired)
                    cells.append(f"{100 * d:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}]; {r:.2f} [{rlo:.2f}, {rhi:.2f}]")
                fh.write(f"| {name} | " + " | ".join(cells) + " |\n")
    print(open(out / f"adam_early{a.tag}.md").read(), flush=True)


if __name__ == "__main__":
    main()
