"""Independent float64 oracles and helpers shared by the tests (the one support module for them)."""

import math

import numpy as np
import pandas as pd
import torch


def autograd_hessian(W: torch.Tensor) -> torch.Tensor:
    """Hessian of W ↦ σ1(W) by autograd, permuted to column-major vec order (docs/theory.md §5)."""
    m, n = W.shape
    H = torch.autograd.functional.hessian(lambda X: torch.linalg.svdvals(X)[0], W)
    return H.permute(1, 0, 3, 2).reshape(m * n, m * n)


def autograd_jacobian(W: torch.Tensor) -> torch.Tensor:
    """Gradient of W ↦ σ1(W) by autograd, as an (m, n) matrix."""
    X = W.detach().clone().requires_grad_(True)
    torch.linalg.svdvals(X)[0].backward()
    return X.grad


def rel_close(a, b, rtol=1e-5, atol=1e-13):
    """|a − b| ≤ rtol·max(|a|, |b|) + atol, for scalars."""
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + atol


# -- the reduced Z-system (tests/sde/test_sde_reduced*.py) --------------------------------------------------
#: Statistical checks against Thm 17 allow this many standard errors.
Z_SE = 4.5


def reduced_coefficients(seed: int, T: int, L: int, dt: float, varying: bool):
    """μ, κ, ‖λ‖² tables (T, L) with ∫κ ∈ [0.1, 0.3], ∫λ² ∈ [0.1, 0.2], |∫μ| ≤ 0.3 per network."""
    rng = np.random.default_rng(seed)
    horizon = T * dt
    shape = (T, L) if varying else (1, L)
    w = rng.uniform(0.2, 1.8, size=shape)  # time profile (mean ≈ 1)
    mu = rng.uniform(-0.3, 0.3, size=(1, L)) / L / horizon * (rng.uniform(0, 2, size=shape) if varying else 1)
    kappa = rng.uniform(0.1, 0.3, size=(1, L)) / L / horizon * w
    lam2 = rng.uniform(0.1, 0.2, size=(1, L)) / L / horizon * (w[::-1] if varying else 1)
    full = lambda a: np.broadcast_to(a, (T, L)).copy()  # noqa: E731
    return full(mu), full(kappa), full(lam2)


def check_thm17(K: torch.Tensor, mean_K: np.ndarray, var_K: np.ndarray, at=(-1,)) -> None:
    """Assert the sample mean and variance of K match Thm 17 within Z_SE standard errors."""
    n = K.shape[1]
    for k in at:
        x = K[k].double()
        m, v = float(x.mean()), float(x.var())
        se_m = float(x.std()) / math.sqrt(n)
        se_v = float(((x - x.mean()) ** 2).std()) / math.sqrt(n)
        # (+ a rounding floor for deterministic systems, whose standard error is 0)
        assert abs(m - mean_K[k]) <= Z_SE * se_m + 1e-9 * abs(mean_K[k]), f"E[K] at {k}: MC {m:.6g} vs Thm 17 {mean_K[k]:.6g} (se {se_m:.2g})"
        assert abs(v - var_K[k]) <= Z_SE * se_v + 1e-12 * mean_K[k] ** 2, f"Var[K] at {k}: MC {v:.6g} vs Thm 17 {var_K[k]:.6g} (se {se_v:.2g})"


def synthetic_record(T=60, L=3, lr=0.01, every=1, seed=0, attrs=True):
    """A synthetic tracking record with the columns sdelip.record.load_record produces."""
    rng = np.random.default_rng(seed)
    steps = np.arange(0, T, every)
    names = [f"features.conv{i}" for i in range(1, L)] + ["classifier.fc"]
    cols = {"step": steps, "t": steps * lr, "loss": rng.uniform(0.5, 2.0, len(steps))}
    for name in names:
        cols[f"K/{name}"] = rng.uniform(1, 3, len(steps))
        cols[f"drift/{name}"] = rng.normal(0, 0.5, len(steps))
        cols[f"noise_curvature/{name}"] = rng.uniform(0, 1, len(steps))
        cols[f"noise_curvature_var/{name}"] = cols[f"noise_curvature/{name}"] * 0.3
        cols[f"noise_curvature_cov/{name}"] = cols[f"noise_curvature/{name}"] * 0.7
        cols[f"diffusion_sq/{name}"] = rng.uniform(0, 2, len(steps))
        cols[f"gap/{name}"] = rng.uniform(0.1, 0.5, len(steps))
    df = pd.DataFrame(cols)
    df["Z"] = sum(np.log(df[f"K/{n}"]) for n in names)
    df["K"] = np.exp(df["Z"])
    for k in ("drift", "noise_curvature", "diffusion_sq"):
        df[f"{k}_Z"] = sum(df[f"{k}/{n}"] for n in names)
    if attrs:
        df.attrs["lr"] = lr
    return df, names


# -- per-sample terms of a tracked step (tests/rules/test_broadcast.py, tests/tracking/test_outside_models.py) -----------------------------------
def per_sample_terms(model, losses_of, layers, lr, *, scale=1.0, batch_grad=False,
                     terms=("drift", "noise_curvature", "noise_curvature_var", "diffusion_sq")):
    """Thm 14 terms of each layer from per-sample gradients by an autograd loop on an untouched copy of ``model``.

    g_i = ``autograd.grad(losses[i], θ)`` (the total derivative over every use of θ) for every
    sample, reduced by :func:`sdelip.core.formulas.layer_terms`; ``layers`` are the tracker's
    (their ``parameter_name`` and ``rule.matrix``). ``scale``: the losses are ``scale`` times the
    loss of interest (a GradScaler's); their per-sample gradients are divided by it.
    ``batch_grad``: μ from the gradient of the batch's ``losses.mean()`` (the gradient an edited
    step applies), not from the mean of the g_i. Returns name → {term: value} for ``terms``.
    """
    import copy

    from sdelip.core.formulas import layer_terms

    m = copy.deepcopy(model)
    params = dict(m.named_parameters(remove_duplicate=False))
    losses = losses_of(m)
    out = {}
    for layer in layers:
        w = params[layer.parameter_name]
        G = torch.stack([torch.autograd.grad(losses[i], w, retain_graph=True, allow_unused=True)[0]
                         for i in range(len(losses))])
        W = layer.rule.matrix(w.detach())
        gbar = None
        if batch_grad:
            gbar = layer.rule.matrix(torch.autograd.grad(losses.mean(), w, retain_graph=True)[0]) / scale
        t = layer_terms(W, G.reshape(G.shape[0], *W.shape) / scale, lr, grad=gbar, split=True)
        out[layer.name] = {q: float(getattr(t, q)) for q in terms}
    return out
