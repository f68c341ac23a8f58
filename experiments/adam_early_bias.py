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
  for both (paired).

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

from ensemble_optimizer_sde import bootstrap_mean_diff, data, lipschitz, sde_runs
from sdelip.sde import DriftOptions, NoiseOptions, OptimizerSDE, SecondMomentOptions
from sdelip.workbench.models import MLP

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8


def expected_batch_square(model, X, Y, M):
    """E_B[g_B∘g_B] over batches of M distinct samples, exactly: ∇L² + (N − M)/(M(N − 1))·σ² per parameter."""
    N = len(X)
    lin = [m for m in model if isinstance(m, nn.Linear)]
    h, inputs, outs = X.reshape(N, -1), [], []
    for i, layer in enumerate(lin):
        inputs.append(h)
        z = layer(h)
        outs.append(z)
        h = torch.relu(z) if i < len(lin) - 1 else z
    deltas = torch.autograd.grad(nn.functional.cross_entropy(h, Y, reduction="sum"), outs)
    c = (N - M) / (M * (N - 1))
    out = {}
    with torch.no_grad():
        for layer, x, d in zip(lin, inputs, deltas):
            for p, mean, sq in ((layer.weight, d.T @ x / N, (d * d).T @ (x * x) / N),
                                (layer.bias, d.sum(0) / N, (d * d).sum(0) / N)):
                out[p] = mean * mean + c * (sq - mean * mean)
    return out


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
    check_steps = 3
    mine = real_runs(model0, X, Y, 1, check_steps, a.batch, sde, "batch")
    ref = lipschitz(torch_adam_run(model0, X, Y, check_steps, a.batch, sde).unsqueeze(0), sde)
    print(f"written-out Adam vs torch.optim.Adam after {check_steps} steps: K {float(mine[-1, 0]):.6f} "
          f"vs {float(ref[0]):.6f}", flush=True)
    for name, mode in (("real", "batch"), ("real, E[v]", "expected"), ("real, E[v] from step 2", "expected_after_1")):
        t0 = time.time()
        variants[name] = real_runs(model0, X, Y, a.n_real, a.steps, a.batch, sde, mode)
        times[name] = time.time() - t0
        print(name, f"{times[name]:.0f} s", flush=True)
    for name, opts in (("SDE", SecondMomentOptions()), ("SDE, v_1 drawn", SecondMomentOptions(first_step="drawn"))):
        t0 = time.time()
        variants[name] = sde_runs(sde_for(opts), a.n_sde, a.steps, seed=11)
        times[name] = time.time() - t0
        print(name, f"{times[name]:.0f} s", flush=True)
    torch.save(variants, out / "adam_early.pt")

    half = (len(X) // a.batch) / 2
    marks = [k for k in (1, 2, 4, 8, round(half), round(2 * half)) if k <= a.steps]
    base = variants["real"]
    with open(out / "adam_early.md", "w") as fh:
        fh.write(f"Adam η = {LR}, M = {a.batch}, B = {a.drift_batch}: {a.n_real} real runs per variant (the same "
                 f"batches in each), {a.n_sde} SDE trajectories per variant (the same driver); runtimes "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + "\n\n")
        fh.write("Mean K, and in brackets its relative difference to the real runs' mean with a bootstrap 95 % "
                 "interval (paired for the real variants: the same runs resampled).\n\n")
        fh.write("| variant | " + " | ".join(f"step {k}" for k in marks) + " |\n")
        fh.write("|---" * (len(marks) + 1) + "|\n")
        for name, K in variants.items():
            cells = []
            for k in marks:
                if name == "real":
                    cells.append(f"{float(K[k].mean()):.4f} (sd {float(K[k].std()):.4f})")
                    continue
                d = float(K[k].mean() / base[k].mean() - 1)
                if name.startswith("real"):  # paired bootstrap
                    g = torch.Generator().manual_seed(0)
                    ii = torch.randint(0, K.shape[1], (2000, K.shape[1]), generator=g)
                    rr = K[k][ii].mean(1) / base[k][ii].mean(1) - 1
                    lo, hi = float(rr.quantile(0.025)), float(rr.quantile(0.975))
                else:
                    lo, hi = bootstrap_mean_diff(base[k], K[k])
                cells.append(f"{float(K[k].mean()):.4f} ({100 * d:+.2f} % [{100 * lo:+.2f}, {100 * hi:+.2f}])")
            fh.write(f"| {name} | " + " | ".join(cells) + " |\n")
    print(open(out / "adam_early.md").read(), flush=True)


if __name__ == "__main__":
    main()
