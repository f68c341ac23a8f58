"""Dynamics terms (Thm 14, 15, 17) against dense float64 formulas and Monte Carlo."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdelip import (
    DegenerateSpectrumWarning,
    decompose,
    layer_terms,
    lipschitz_moments,
    network_terms,
    terms_from_projections,
    top_singular,
)
from sdelip.core.spectral import vec

from oracles import autograd_hessian, autograd_jacobian
from strategies import layer_with_gradients, separated_matrix

SETTINGS = settings(max_examples=40, deadline=None)


def dense_terms(W, G, lr, grad=None, extra_noise_var=0.0):
    """Oracle: docs/theory.md §6 with dense Σ̂, autograd J and H (float64)."""
    M = G.shape[0]
    mn = W.numel()
    sigma1 = float(torch.linalg.svdvals(W)[0])
    J = vec(autograd_jacobian(W))
    H = autograd_hessian(W)
    Sigma = torch.cov(vec(G).T, correction=1).reshape(mn, mn) / M + extra_noise_var * torch.eye(mn, dtype=W.dtype)
    grad = G.mean(0) if grad is None else grad
    diag = torch.diag(torch.diagonal(Sigma))
    return {
        "sigma1": sigma1,
        "drift": float(-(J @ vec(grad)) / sigma1),
        "diffusion_sq": float(lr / sigma1**2 * J @ Sigma @ J),
        "noise_curvature": float(lr / (2 * sigma1) * torch.trace(H @ Sigma)),
        "noise_curvature_var": float(lr / (2 * sigma1) * torch.trace(H @ diag)),
        "noise_curvature_cov": float(lr / (2 * sigma1) * torch.trace(H @ (Sigma - diag))),
        "step_curvature": float(lr / (2 * sigma1) * (vec(G.mean(0)) @ H @ vec(G.mean(0))
                                                     - torch.trace(H @ (Sigma - extra_noise_var * torch.eye(mn, dtype=W.dtype))))),
    }


def assert_terms_close(got, want, rtol=1e-8, scale=None):
    for key, value in want.items():
        atol = rtol * (scale if scale is not None else max(abs(v) for v in want.values()))
        assert math.isclose(got[key], value, rel_tol=rtol, abs_tol=atol), (key, got[key], value)


@SETTINGS
@given(layer_with_gradients(), st.sampled_from([1e-3, 0.01, 0.5]))
def test_layer_terms_match_dense_formulas(WG, lr):
    W, G = WG
    got = layer_terms(W, G, lr).as_dict()
    assert_terms_close(got, dense_terms(W, G, lr))
    assert got["noise_curvature"] >= 0 and got["diffusion_sq"] >= 0
    assert math.isclose(got["gap"], float(decompose(W).gap), rel_tol=1e-12)


@SETTINGS
@given(layer_with_gradients(), st.integers(0, 1000))
def test_expected_gradient_is_used_for_the_drift(WG, seed):
    W, G = WG
    grad = torch.randn(W.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = layer_terms(W, G, 0.1, grad=grad).as_dict()
    want = dense_terms(W, G, 0.1, grad=grad)
    want.pop("step_curvature")  # always from the mini-batch, checked elsewhere
    assert_terms_close(got, want)


@SETTINGS
@given(layer_with_gradients(), st.sampled_from([0.5, 2.0]))
def test_isotropic_extra_noise(WG, s2):
    """Sec 8.4: an isotropic perturbation s²I of the batch-gradient covariance."""
    W, G = WG
    got = layer_terms(W, G, 0.05, extra_noise_var=s2).as_dict()
    assert_terms_close(got, dense_terms(W, G, 0.05, extra_noise_var=s2))


@SETTINGS
@given(layer_with_gradients(), st.sampled_from([1e-3, 0.1]))
def test_weight_decay_is_exactly_minus_lambda_in_the_drift(WG, wd):
    """L2 penalty (λ/2)‖θ‖² adds λθ to every per-sample gradient: μ −= λ, noise unchanged."""
    W, G = WG
    base = layer_terms(W, G, 0.1).as_dict()
    with_penalty_in_gradients = layer_terms(W, G + wd * W, 0.1).as_dict()
    through_optimizer = layer_terms(W, G, 0.1, weight_decay=wd).as_dict()
    assert math.isclose(through_optimizer["drift"], base["drift"] - wd, rel_tol=1e-12, abs_tol=1e-12)
    for key in ("drift", "diffusion_sq", "noise_curvature", "noise_curvature_var", "step_curvature"):
        assert math.isclose(with_penalty_in_gradients[key], through_optimizer[key], rel_tol=1e-8, abs_tol=1e-10)


@SETTINGS
@given(layer_with_gradients(min_gap=0.2))
def test_float32_agrees_with_float64(WG):
    W, G = WG
    want = layer_terms(W, G, 0.1).as_dict()
    got = layer_terms(W.float(), G.float(), 0.1).as_dict()
    scale = max(abs(v) for k, v in want.items() if k not in ("degenerate",))
    for key in ("sigma1", "drift", "diffusion_sq", "noise_curvature", "noise_curvature_var", "gap"):
        assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-4 * scale), (key, got[key], want[key])


def test_degenerate_layer_is_flagged_not_nan():
    W = torch.diag(torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64))
    G = torch.randn(6, 3, 3, dtype=torch.float64)
    with pytest.warns(DegenerateSpectrumWarning, match="layer 'fc'"):
        t = layer_terms(W, G, 0.1, name="fc")
    assert t.degenerate
    assert all(math.isfinite(v) for k, v in t.as_dict().items() if k != "degenerate")


def test_layer_terms_checks_inputs():
    W = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="M = 1"):
        layer_terms(W, torch.randn(1, 3, 2, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="shape"):
        layer_terms(W, torch.randn(4, 2, 3, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="lr"):
        layer_terms(W, torch.randn(4, 3, 2, dtype=torch.float64), -1.0)
    G = torch.randn(4, 3, 2, dtype=torch.float64)
    G[2, 1, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="layer 'fc2'"):
        layer_terms(W, G, 0.1, name="fc2")


def test_network_terms_sum_layers():
    gen = torch.Generator().manual_seed(0)
    layers = [
        layer_terms(separated_matrix(m, n, seed=k), torch.randn(5, m, n, generator=gen, dtype=torch.float64), 0.1)
        for k, (m, n) in enumerate([(4, 3), (2, 4), (1, 2)])
    ]
    net = network_terms(layers)
    assert math.isclose(net.Z, sum(math.log(float(t.sigma1)) for t in layers), rel_tol=1e-12)
    assert math.isclose(net.K, math.prod(float(t.sigma1) for t in layers), rel_tol=1e-12)
    assert math.isclose(net.drift_Z, sum(float(t.drift) for t in layers), rel_tol=1e-12)
    assert math.isclose(net.noise_curvature_Z, sum(float(t.noise_curvature) for t in layers), rel_tol=1e-12)
    assert math.isclose(net.diffusion_sq_Z, sum(float(t.diffusion_sq) for t in layers), rel_tol=1e-12)
    assert math.isclose(
        net.noise_curvature_var_Z + net.noise_curvature_cov_Z, net.noise_curvature_Z, rel_tol=1e-10
    )
    assert math.isclose(net.log_drift, net.drift_Z + net.noise_curvature_Z - 0.5 * net.diffusion_sq_Z)
    with pytest.raises(ValueError):
        network_terms([])


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 40),
    st.floats(0.1, 10.0),
    st.floats(1e-4, 0.5),
    st.integers(0, 10_000),
)
def test_lipschitz_moments_match_their_definitions(T, K0, dt, seed):
    rng = np.random.default_rng(seed)
    mu, kappa, lam2 = rng.normal(size=T), rng.uniform(0, 1, T), rng.uniform(0, 2, T)
    mom = lipschitz_moments(K0, mu, kappa, lam2, dt)
    assert mom.t.shape == (T + 1,) and mom.t[0] == 0 and math.isclose(mom.t[-1], T * dt)
    for k in range(T + 1):
        ez = math.log(K0) + sum((mu[j] + kappa[j] - 0.5 * lam2[j]) * dt for j in range(k))
        vz = sum(lam2[j] * dt for j in range(k))
        assert math.isclose(mom.mean_Z[k], ez, rel_tol=1e-10, abs_tol=1e-12)
        assert math.isclose(mom.var_Z[k], vz, rel_tol=1e-10, abs_tol=1e-14)
        ek = math.exp(ez + 0.5 * vz)  # Eq. 15 via the log-normal MGF (Lemma 19)
        assert math.isclose(mom.mean_K[k], ek, rel_tol=1e-9)
        assert math.isclose(mom.var_K[k], ek**2 * math.expm1(vz), rel_tol=1e-9, abs_tol=1e-300)


def test_lipschitz_moments_monte_carlo():
    """E[K], Var[K] of Thm 17 against an exact simulation of the Z-SDE with time-varying coefficients."""
    rng = np.random.default_rng(1)
    T, dt, K0, n = 50, 0.02, 2.0, 400_000
    t = np.arange(T) * dt
    mu, kappa, lam2 = np.sin(5 * t), 0.3 + 0.1 * t, 0.5 + 0.5 * np.cos(3 * t) ** 2
    Z = np.full(n, math.log(K0))
    for k in range(T):  # Gaussian increments are exact for piecewise-constant coefficients
        Z += (mu[k] + kappa[k] - 0.5 * lam2[k]) * dt + math.sqrt(lam2[k] * dt) * rng.standard_normal(n)
    K = np.exp(Z)
    mom = lipschitz_moments(K0, mu, kappa, lam2, dt)
    se_mean = K.std() / math.sqrt(n)
    assert abs(K.mean() - mom.mean_K[-1]) < 5 * se_mean
    se_var = np.sqrt(np.var((K - K.mean()) ** 2) / n)
    assert abs(K.var() - mom.var_K[-1]) < 5 * se_var
    assert abs(Z.mean() - mom.mean_Z[-1]) < 5 * Z.std() / math.sqrt(n)


def test_lipschitz_moments_checks_inputs():
    with pytest.raises(ValueError, match="equal lengths"):
        lipschitz_moments(1.0, [0.0, 1.0], [0.0], [0.0, 0.0], 0.1)
    with pytest.raises(ValueError, match="dt"):
        lipschitz_moments(1.0, [0.0], [0.0], [0.0], 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        lipschitz_moments(1.0, [float("nan")], [0.0], [0.0], 0.1)
    with pytest.raises(ValueError, match="K0"):
        lipschitz_moments(-1.0, [0.0], [0.0], [0.0], 0.1)


@pytest.mark.parametrize("centred", [True, False])
def test_single_sgd_step_matches_ito_terms(centred):
    """docs/theory.md §6: over many mini-batches at fixed θ, one SGD step gives
    E[ΔK/K] = (μ + κ)η + ½η²∇LᵀH∇L/σ1 + O(η³) and Var[ΔK/K] = ‖λ‖²η + O(η²).

    The per-sample gradients are a fixed population of N vectors (a loss linear in θ);
    mini-batches of M are drawn with replacement, so the batch-gradient covariance is
    exactly Σ = Var_pop[g]/M. A symmetric population (g and −g) removes odd moments.
    """
    gen = torch.Generator().manual_seed(7)
    m, n, N, M, R = 4, 3, 30, 8, 60_000
    W = separated_matrix(m, n, seed=11, min_gap=0.2)
    half = torch.randn(N // 2, m, n, generator=gen, dtype=torch.float64)
    pop = torch.cat([half, -half]) + (0.0 if centred else 0.3 * torch.randn(m, n, generator=gen, dtype=torch.float64))
    lr = 0.15
    # Terms at the population level: layer_terms on the population gives Σ̂ = Var_{N-1}/N;
    # the mini-batch covariance is Var_pop/M = Var_{N-1}·(N−1)/(N·M).
    pop_terms = layer_terms(W, pop, lr)
    scale = N * (N - 1) / (N * M)
    mu = float(pop_terms.drift)
    kappa = float(pop_terms.noise_curvature) * scale
    sigma1 = float(pop_terms.sigma1)
    grad = pop.mean(0)
    H = autograd_hessian(W)
    remainder = 0.5 * lr**2 * float(vec(grad) @ H @ vec(grad)) / sigma1

    idx = torch.randint(0, N, (R, M), generator=gen)
    batch_grads = pop[idx].mean(1)

    def relative_changes(eta):
        return (torch.linalg.matrix_norm(W - eta * batch_grads, ord=2) / sigma1 - 1).numpy()

    rel = relative_changes(lr)
    mean_pred = (mu + kappa) * lr + remainder
    se = rel.std() / math.sqrt(R)
    assert abs(rel.mean() - mean_pred) < 4 * se + 0.02 * abs(kappa * lr)
    # κ matters: without it the prediction is off by many standard errors.
    assert abs(rel.mean() - (mu * lr + remainder)) > 8 * se
    # Variance: checked at a smaller step, where the O(η²) remainder is below 1 %;
    # its relative standard error is √((kurtosis − 1)/R).
    small = lr / 15
    rel = relative_changes(small)
    var_pred = float(pop_terms.diffusion_sq) / lr * small * scale * small  # ‖λ‖² ∝ η, times dt = η
    c = rel - rel.mean()
    se_rel_var = math.sqrt(np.mean(c**4) / np.mean(c**2) ** 2 - 1) / math.sqrt(R)
    assert abs(rel.var() / var_pred - 1) < 4 * se_rel_var + 0.01
    # and the diffusion really is ‖λ‖²η, not ‖λ‖²η/2 or 2‖λ‖²η:
    assert abs(rel.var() / var_pred - 1) < 0.25


def test_step_curvature_is_unbiased_for_the_discrete_step_drift():
    """(η/2σ1)(ḡᵀHḡ − tr(HΣ̂)) averages to (η/2σ1)∇LᵀH∇L over iid mini-batches."""
    gen = torch.Generator().manual_seed(5)
    m, n, N, M, R, lr = 4, 3, 40, 6, 6000, 0.1
    W = separated_matrix(m, n, seed=2, min_gap=0.2)
    pop = torch.randn(N, m, n, generator=gen, dtype=torch.float64) + 0.7 * torch.randn(m, n, generator=gen,
                                                                                         dtype=torch.float64)
    H = autograd_hessian(W)
    grad = pop.mean(0)
    sigma1 = float(torch.linalg.svdvals(W)[0])
    target = lr / (2 * sigma1) * float(vec(grad) @ H @ vec(grad))
    d = decompose(W)
    idx = torch.randint(0, N, (R, M), generator=gen)
    batches = pop[idx]  # (R, M, m, n), sampled with replacement
    values = torch.stack([
        terms_from_projections(d, b @ d.v1, b.mT @ d.u1, lr).step_curvature for b in batches
    ])
    se = float(values.std()) / math.sqrt(R)
    assert abs(float(values.mean()) - target) < 4 * se
    # Without the −tr(HΣ̂) correction the estimate is biased by κ: many standard errors away.
    kappa = torch.stack([terms_from_projections(d, b @ d.v1, b.mT @ d.u1, lr).noise_curvature for b in batches])
    assert abs(float((values + kappa).mean()) - target) > 8 * se
