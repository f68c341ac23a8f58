"""ParameterSDE (Def 4): coefficients estimated live, and the single-step Itô check.

The single-step property test (docs/theory.md §6): at a fixed small random layer θ with a
controlled spectral gap and a random low-rank Σ̂ = ΩᵀΩ/M, one Euler step of the
parameter SDE through torchsde.sdeint, over n = 60,000 independent Brownian increments,
gives ΔK/K with E = (μ + κ)dt + O(dt²) and Var = ‖λ‖²dt + O(dt²), the terms computed by
sdelip.layer_terms. The step is scaled so that ‖λ‖²dt ≤ 1e-3 and (κ/‖λ‖²)²‖λ‖²dt ≤ 2.5e-3,
which keeps the O(dt²) remainders well below the sampling error. Tolerances: mean
within 4.5 standard errors s/√n (+5 % of κdt), variance within 4.5·√(2/(n−1)) relative
(the standard error of a Gaussian sample variance). κdt is then about 12 standard
errors, so the check fails when κ is left out (tested).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchsde
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from sdelip import GradientNoise, layer_terms
from sdelip.sde import DataSource, DenseDiffusion, GradientEstimate, GridBrownian, ParameterSDE, simulate, time_grid

Z_SE = 4.5


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread (tests/conftest.py)


def _orthonormal(k, r, gen):
    Q, R = torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def _one_step_case(m, k, M, seed, eta=0.1):
    """θ (σ1 = 1, σ2 ≤ 0.7), per-sample gradients G (M, m, k) and ∇L, scaled for one step dt = η."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, k)
    s = torch.cat([torch.ones(1, dtype=torch.float64),
                   0.7 * torch.cumprod(0.5 + 0.4 * torch.rand(p - 1, generator=gen, dtype=torch.float64), 0)])
    W = (_orthonormal(m, p, gen) * s) @ _orthonormal(k, p, gen).mT
    G = torch.randn(M, m, k, generator=gen, dtype=torch.float64)
    grad = torch.randn(m, k, generator=gen, dtype=torch.float64)
    dt = eta
    t0 = layer_terms(W, G, eta, grad=grad, split=False)
    ratio = float(t0.noise_curvature / t0.diffusion_sq)
    target = min(1e-3, 2.5e-3 / ratio**2)  # ‖λ‖²dt
    G = G * math.sqrt(target / (float(t0.diffusion_sq) * dt))
    grad = grad * (1e-3 / (float(grad.norm()) * dt))
    return W, G, grad, dt, ratio


def _fixed_gradients(grad, G):
    # Leading dimension 1: broadcast to every trajectory by the SDE.
    return lambda params: GradientEstimate(grad={"weight": grad[None]}, per_sample={"weight": G[None]})


def _one_step_increments(W, G, grad, eta, dt, n, seed):
    m, k = W.shape
    model = nn.Linear(k, m, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(W)
    sde = ParameterSDE(model, lr=eta, gradient_fn=_fixed_gradients(grad, G), noise_batch_size=G.shape[0])
    bm = GridBrownian(0.0, dt, (n, sde.brownian_size), seed=seed, dtype=torch.float64)
    ts = torch.tensor([0.0, dt], dtype=torch.float64)
    ys = torchsde.sdeint(sde, sde.initial_state(n), ts, bm=bm, dt=dt, method="euler")
    return sde.direct_lipschitz(ys[-1]) / torch.linalg.svdvals(W)[0] - 1.0  # ΔK/K


def check_one_step(x, expected_mean, expected_var, kappa_dt):
    n = x.numel()
    mean, var = float(x.mean()), float(x.var())
    se = float(x.std()) / math.sqrt(n)
    assert abs(mean - expected_mean) <= Z_SE * se + 0.05 * kappa_dt, (
        f"E[ΔK/K] = {mean:.4g}, expected {expected_mean:.4g} (se {se:.2g})")
    assert abs(var / expected_var - 1.0) <= Z_SE * math.sqrt(2.0 / (n - 1)), (
        f"Var[ΔK/K] = {var:.4g}, expected {expected_var:.4g}")


one_step_cases = st.tuples(
    st.integers(2, 5), st.integers(2, 5), st.integers(3, 8), st.integers(0, 2**31 - 1)
)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(case=one_step_cases)
def test_one_step_euler_increment_matches_ito_terms(case):
    """Thm 14 at one step: E[ΔK/K] ≈ (μ + κ)dt, Var[ΔK/K] ≈ ‖λ‖²dt."""
    m, k, M, seed = case
    W, G, grad, dt, ratio = _one_step_case(m, k, M, seed)
    assume(ratio >= 1.6)  # κdt ≥ ~12 standard errors: the κ term is visible
    eta = dt
    t = layer_terms(W, G, eta, grad=grad, split=False)
    x = _one_step_increments(W, G, grad, eta, dt, 60_000, seed)
    mu, kappa, lam2 = float(t.drift), float(t.noise_curvature), float(t.diffusion_sq)
    check_one_step(x, (mu + kappa) * dt, lam2 * dt, kappa * dt)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_step_check_goes_red_without_kappa(seed):
    """Leaving κ out of the expected drift (μ dt alone) fails the same statistical check."""
    rng = np.random.default_rng(seed)
    while True:
        m, k, M, s = int(rng.integers(2, 6)), int(rng.integers(2, 6)), int(rng.integers(3, 9)), int(rng.integers(2**31))
        W, G, grad, dt, ratio = _one_step_case(m, k, M, s)
        if ratio >= 1.6:
            break
    t = layer_terms(W, G, dt, grad=grad, split=False)
    x = _one_step_increments(W, G, grad, dt, dt, 60_000, s)
    mu, kappa, lam2 = float(t.drift), float(t.noise_curvature), float(t.diffusion_sq)
    check_one_step(x, (mu + kappa) * dt, lam2 * dt, kappa * dt)
    with pytest.raises(AssertionError, match="E\\[ΔK/K\\]"):
        check_one_step(x, mu * dt, lam2 * dt, kappa * dt)


# -- the estimator on a real model ----------------------------------------------------------


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _data(N=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (N,), generator=gen)


def _perturbed_state(sde, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = sde.initial_state(n)
    return y + 0.1 * torch.randn(y.shape, generator=gen, dtype=y.dtype)


def _reference_gradients(model, flat, layout, X, Y):
    """Autograd, one sample at a time: the expected gradient and per-sample gradients."""
    params = {k: v.clone().requires_grad_(True) for k, v in layout.unflatten(flat).items()}
    per = []
    for x, y in zip(X, Y):
        out = torch.func.functional_call(model, params, (x[None],))
        g = torch.autograd.grad(nn.functional.cross_entropy(out, y[None]), list(params.values()))
        per.append(torch.cat([gi.reshape(-1) for gi in g]))
    return torch.stack(per)  # (N, P), layout order


def test_drift_is_minus_full_gradient_and_diffusion_is_the_prop5_factor():
    model, (X, Y) = _mlp(), _data()
    eta, M = 0.05, 6
    sde = ParameterSDE(model, (X, Y), lr=eta, noise_batch_size=M, seed=123)
    assert sde.gradient_fn.grad_source == "full"
    assert sde.brownian_size == 2 * M  # one block per Linear: weight and bias together
    y = _perturbed_state(sde, 3)
    f = sde.f(0.0, y)
    g = DenseDiffusion(sde).g(0.0, y)
    assert sde.n_evaluations == 1  # f and g share one evaluation (one mini-batch)
    v = torch.randn(3, sde.brownian_size, dtype=torch.float64)
    torch.testing.assert_close(sde.g_prod(0.0, y, v), torch.einsum("nij,nj->ni", g, v))
    assert sde.n_evaluations == 1
    # The noise mini-batches: the first draws of a DataSource with the same seed.
    Xb, Yb = DataSource((X, Y), seed=123).sample(M, 3)
    for i in range(3):
        full = _reference_gradients(model, y[i], sde.layout, X, Y).mean(0)
        torch.testing.assert_close(f[i], -full)
        per = _reference_gradients(model, y[i], sde.layout, Xb[i], Yb[i])
        E = (per - per.mean(0)) * math.sqrt(eta / (M * (M - 1)))
        for b, block in enumerate(sde.layout.blocks):
            cols = g[i, block.start:block.stop, b * M:(b + 1) * M]
            torch.testing.assert_close(cols, E[:, block.start:block.stop].mT)
            others = torch.cat([g[i, :block.start, b * M:(b + 1) * M], g[i, block.stop:, b * M:(b + 1) * M]])
            assert float(others.abs().max()) == 0.0  # block-diagonal across layers (Assumption 3)
        # GGᵀ on a weight is η Σ̂ of Prop 5 (GradientNoise, column-major vec there).
        spec = sde.layout["0.weight"]
        Gw = per[:, spec.start:spec.stop].reshape(M, 5, 3)
        cov_cm = GradientNoise.from_per_sample(Gw).cov()
        perm = torch.arange(15).reshape(3, 5).mT.reshape(-1)  # row-major index -> column-major index
        Gs = g[i, spec.start:spec.stop]
        torch.testing.assert_close(Gs @ Gs.mT, eta * cov_cm[perm][:, perm])
    # A new state is a new evaluation with a fresh mini-batch.
    y2 = y.clone()
    g2 = DenseDiffusion(sde).g(0.0, y2)
    assert sde.n_evaluations == 2 and not torch.allclose(g2, g)


def test_weight_decay_batch_source_and_errors():
    model, (X, Y) = _mlp(), _data(N=200)
    sde = ParameterSDE(model, (X, Y), lr=0.1, noise_batch_size=4, weight_decay=0.01)
    y = _perturbed_state(sde, 2)
    plain = ParameterSDE(model, (X, Y), lr=0.1, noise_batch_size=4)
    torch.testing.assert_close(sde.f(0.0, y), plain.f(0.0, y) - 0.01 * y)
    batch = ParameterSDE(model, (X, Y), lr=0.1, noise_batch_size=4, full_max=100, grad_batch_size=150)
    assert batch.gradient_fn.grad_source == "batch"
    fb = batch.f(0.0, y)
    assert not torch.allclose(fb, plain.f(0.0, y))  # an independent batch of 150, not the full set
    torch.testing.assert_close(fb, plain.f(0.0, y), atol=0.2, rtol=0.5)
    with pytest.raises(ValueError, match="M >= 2"):
        ParameterSDE(model, (X, Y), lr=0.1, noise_batch_size=1)
    with pytest.raises(TypeError, match="noise_batch_size"):
        ParameterSDE(model, (X, Y), lr=0.1)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(NotImplementedError, match="BatchNorm"):
        ParameterSDE(bn, (X.float(), Y), lr=0.1, noise_batch_size=4)


def test_sdeint_with_a_dataloader_and_the_front_end():
    model = _mlp()
    X, Y = _data(N=96)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=8, shuffle=True)
    sde = ParameterSDE(model, loader, lr=0.1)
    assert sde.M == 8
    ts = time_grid(0.5, 0.1)
    ys = torchsde.sdeint(sde, sde.initial_state(4), ts, dt=0.1, method="euler",
                         bm=GridBrownian(0.0, 0.1, (4, sde.brownian_size), dtype=torch.float64))
    assert ys.shape == (6, 4, sde.state_size) and torch.isfinite(ys).all()
    K = sde.lipschitz(ys)
    assert K.shape == (6, 4) and torch.allclose(K[0], K[0, :1].expand(4))
    res = simulate(sde, 6, ts, progress=False, chunk_size=4, seed=1)
    again = simulate(sde, 6, ts, progress=False, chunk_size=4, seed=1)
    np.testing.assert_array_equal(res.mean_K, again.mean_K)
    assert res.n == 6 and res.mean_K.shape == (6,) and np.all(res.var_K[1:] > 0)


def test_frozen_parameters_are_constants_and_degenerate_layers_warn_once():
    import warnings

    from sdelip import DegenerateSpectrumWarning
    from sdelip.sde import LipschitzSDE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # float32 model
    model[0].requires_grad_(False)
    X, Y = _data(32)
    sde = ParameterSDE(model, (X, Y), lr=0.1, noise_batch_size=4)  # float64 data and state
    assert sde.n_params == 4 * 2 + 2 and sde.layer_names == ["2"]
    y = sde.initial_state(2, dtype=torch.float64)
    out = torch.tanh(X @ model[0].weight.double().T + model[0].bias.double())
    w = y[0, :8].reshape(2, 4).requires_grad_(True)
    b = y[0, 8:].clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(out @ w.T + b, Y)
    gw, gb = torch.autograd.grad(loss, [w, b])
    torch.testing.assert_close(sde.f(0.0, y)[0], -torch.cat([gw.reshape(-1), gb]))
    # A layer with a repeated top singular value: one warning per system, not per step.
    lin = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2, dtype=torch.float64))
    lsde = LipschitzSDE(lin, (X[:, :2], Y), lr=0.1, noise_batch_size=4)
    y = lsde.initial_state(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lsde.f(0.0, y)
        lsde.f(0.1, y.clone())
    assert sum(issubclass(w.category, DegenerateSpectrumWarning) for w in caught) == 1
