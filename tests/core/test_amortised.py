"""sdelip.core.amortised: the warm-started eigenpairs, their a posteriori bound and the fall-backs."""

from __future__ import annotations

import math

import pytest
import torch

from sdelip.core.amortised import AmortisedCurvature, AmortisedGeometry, eigen_bound, warm_top_eigenpairs
from sdelip.core.decompositions import decompose_layer
from sdelip.core.spectral import SpectralDecomposition


def walk(m=96, n=160, steps=8, seed=0, rate=2e-3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    W[:, :2] *= 3.0
    out = []
    for _ in range(steps):
        W = W + rate * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
        out.append(W.clone())
    return out


def test_bound_covers_the_actual_errors_of_truncated_refinements():
    """Stopped early (large target), the bound still exceeds the true errors of u1, λ1 and the gap."""
    Ws = walk()
    G0 = Ws[0] @ Ws[0].T
    _, Z0 = torch.linalg.eigh(G0)
    X0 = Z0[:, -4:].flip(1)
    G = Ws[1] @ Ws[1].T
    lam, Q = torch.linalg.eigh(G)
    lam, Q = lam.flip(0), Q.flip(1)
    for target in (1e-2, 1e-4, 1e-6, 1e-9):
        w, Y, bound, k = warm_top_eigenpairs(G, X0, target, 64)
        sin_u = float(torch.linalg.norm(Y[:, 0] - torch.sign(Y[:, 0] @ Q[:, 0]) * Q[:, 0]))
        gap_true = 1 - math.sqrt(float(lam[1] / lam[0]))
        gap_est = 1 - math.sqrt(float(w[1] / w[0]))
        assert sin_u <= bound * 1.01 + 1e-14
        assert abs(float(w[0] - lam[0])) / float(lam[0]) <= bound + 1e-14
        assert abs(gap_est - gap_true) / gap_true <= bound * 1.01 + 1e-13
        assert bound <= target or k + 4 > 64


def test_eigen_bound_refuses_a_reordered_spectrum():
    # θ2 + r2 reaches θ1: λ1 is not separated from the rest, no bound
    assert eigen_bound(torch.tensor([1.0, 0.99, 0.5]), torch.tensor([0.0, 0.02, 0.0])) == math.inf
    assert eigen_bound(torch.tensor([1.0, 0.99, 0.5]), torch.tensor([0.02, 0.0, 0.0])) > 1.0
    assert eigen_bound(torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.0, 0.0, 0.0])) == 0.0


def test_geometry_matches_fast_route_and_counts():
    geo = AmortisedGeometry()
    N = torch.rand(96, 160, dtype=torch.float64)
    A, B = torch.randn(5, 96, dtype=torch.float64), torch.randn(5, 160, dtype=torch.float64)
    for k, W in enumerate(walk()):
        d = geo.decompose(W, "amortised", 1e-6, name="w", step=k)
        e = decompose_layer(W, "fast", 1e-6)
        assert isinstance(d, AmortisedCurvature) and d.amortised == (k > 0)
        for x, y in ((d.sigma1, e.sigma1), (d.gap, e.gap), (d.hessian_quadform_sum(A, B), e.hessian_quadform_sum(A, B)),
                     (d.hessian_diag_dot(N)[0], e.hessian_diag_dot(N)[0]), (d.hessian_trace(), e.hessian_trace())):
            assert abs(float(x - y)) <= 1e-9 * abs(float(y))
    s = geo.summary()
    assert (s["amortised_layer_steps"], s["exact_layer_steps"], s["bound_fallbacks"]) == (7, 1, 0)
    # a transposed (tall) layer, and a shape change restarts from the exact route
    d = geo.decompose(walk(160, 96)[0], "amortised", 1e-6, name="w", step=9)
    assert not d.amortised and d.transposed


def test_small_layers_and_auto_take_the_fast_route():
    geo = AmortisedGeometry()
    W = walk(20, 40)[0]
    assert not isinstance(geo.decompose(W, "amortised", 1e-6, name="s"), AmortisedCurvature)
    W = walk(64, 100)[0]
    assert geo.route(W, "auto") == "fast" and geo.route(W, "amortised") == "amortised"
    assert geo.summary()["layers"]["s"]["route"] == "fast"


def test_degenerate_spectrum_takes_the_svd_route():
    geo = AmortisedGeometry()
    U, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(96, 64, dtype=torch.float64))
    S = torch.linspace(1.0, 0.1, 64, dtype=torch.float64)
    S[1] = S[0]
    W = U @ torch.diag(S) @ V.T
    with pytest.warns(Warning):
        d = geo.decompose(W, "amortised", 1e-6, name="d")
    assert isinstance(d, SpectralDecomposition) and d.degenerate
    assert geo.summary()["layers"]["d"]["route"] == "svd"
