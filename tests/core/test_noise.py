"""Gradient-noise estimator (Prop 5, 6, 7) against direct float64 computations."""

import pytest
import torch
from hypothesis import given, settings

from sdelip import GradientNoise
from sdelip.core.spectral import vec

from strategies import layer_with_gradients

SETTINGS = settings(max_examples=40, deadline=None)


def direct_cov(G: torch.Tensor) -> torch.Tensor:
    """Oracle: Σ̂ = (1/M)·unbiased covariance of the flattened (column-major) gradients."""
    M = G.shape[0]
    return torch.cov(vec(G).T, correction=1).reshape(vec(G).shape[1], -1) / M


@SETTINGS
@given(layer_with_gradients())
def test_cov_matches_direct_covariance(WG):
    _, G = WG
    noise = GradientNoise.from_per_sample(G)
    torch.testing.assert_close(noise.cov(), direct_cov(G), rtol=1e-10, atol=1e-12)
    assert noise.batch_size == G.shape[0]
    torch.testing.assert_close(noise.mean, G.mean(0))


@SETTINGS
@given(layer_with_gradients())
def test_variance_plus_covariance_is_cov(WG):
    _, G = WG
    noise = GradientNoise.from_per_sample(G)
    C = noise.cov()
    torch.testing.assert_close(vec(noise.var()), torch.diagonal(C))
    torch.testing.assert_close(torch.diag(vec(noise.var())) + noise.cov_offdiag(), C)
    assert torch.count_nonzero(torch.diagonal(noise.cov_offdiag())) == 0
    # Elementwise oracle for the variance (Prop 6): unbiased variance of each entry / M.
    torch.testing.assert_close(noise.var(), G.var(0, correction=1) / G.shape[0])


@SETTINGS
@given(layer_with_gradients())
def test_square_root_and_factor(WG):
    _, G = WG
    noise = GradientNoise.from_per_sample(G)
    C = noise.cov()
    R = noise.sqrt()
    torch.testing.assert_close(R, R.mT, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(R @ R, C, rtol=1e-8, atol=1e-10 * float(C.abs().max()))
    assert float(torch.linalg.eigvalsh(R).min()) > -1e-8 * float(R.abs().max())
    F = noise.factor()
    assert F.shape == (G.shape[1] * G.shape[2], G.shape[0])
    torch.testing.assert_close(F @ F.mT, C, rtol=1e-10, atol=1e-12)


def test_square_root_drops_the_null_eigenvalue():
    """rank Ω ≤ M − 1: Prop 7 with Λ^{-1/2} taken literally would divide by ~0."""
    G = torch.randn(4, 3, 5, dtype=torch.float64)
    noise = GradientNoise.from_per_sample(G)
    lam = torch.linalg.eigvalsh(noise.omega @ noise.omega.mT / 4)
    assert float(lam[0]) < 1e-12 * float(lam[-1])  # the zero eigenvalue is there
    R = noise.sqrt()
    assert torch.isfinite(R).all()
    torch.testing.assert_close(R @ R, noise.cov(), rtol=1e-8, atol=1e-12)


@SETTINGS
@given(layer_with_gradients())
def test_quadform(WG):
    W, G = WG
    noise = GradientNoise.from_per_sample(G)
    A = torch.randn(3, *W.shape, dtype=torch.float64)
    expected = torch.einsum("bi,ij,bj->b", vec(A), noise.cov(), vec(A))
    torch.testing.assert_close(noise.quadform(A), expected, rtol=1e-10, atol=1e-12)


def test_batch_size_one_is_a_clear_error():
    with pytest.raises(ValueError, match="M = 1"):
        GradientNoise.from_per_sample(torch.randn(1, 3, 2))


def test_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(M, m, n\)"):
        GradientNoise.from_per_sample(torch.randn(4, 6))


def test_unbiased_monte_carlo():
    """Σ̂ is unbiased (Prop 5): its average over many mini-batches approaches Var[g]/M."""
    gen = torch.Generator().manual_seed(0)
    m, n, M, reps = 2, 2, 3, 20000
    L = torch.tensor([[1.0, 0, 0, 0], [0.5, 1.0, 0, 0], [0.2, -0.3, 0.7, 0], [0, 0.4, 0.1, 0.5]], dtype=torch.float64)
    true_cov = L @ L.T / M
    z = torch.randn(reps, M, 4, generator=gen, dtype=torch.float64) @ L.T + 3.0
    G = z.reshape(reps, M, n, m).mT  # column-major vec(g_i) = z
    omega = (G - G.mean(1, keepdim=True)).mT.reshape(reps, M, 4) / (M - 1) ** 0.5
    est = (omega.mT @ omega / M).mean(0)
    # Each entry of Σ̂ is an average of reps iid terms: tolerance of 5 standard errors.
    per = omega.mT @ omega / M
    se = per.std(0) / reps**0.5
    assert torch.all((est - true_cov).abs() < 5 * se + 1e-12)
    # And the class gives the same per-batch estimate.
    torch.testing.assert_close(GradientNoise.from_per_sample(G[0]).cov(), per[0])
