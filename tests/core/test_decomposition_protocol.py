"""One decomposition protocol, one terms formula: every route against independent float64 oracles.

Routes: the thin SVD and the full Gram eigendecomposition (:func:`sdelip.core.spectral.decompose`),
the resolvent of the Gram matrix (:func:`sdelip.core.decompositions.gram_curvature`), and both
batched routes over trajectories (:func:`sdelip.core.decompositions.decompose_batched`).
"""

import math

import attrs
import pytest
import torch

from sdelip.core.decompositions import Decomposition, decompose_batched, gram_curvature
from sdelip.core.formulas import LayerTerms, terms_from_projections
from sdelip.core.spectral import decompose, unvec, vec

from oracles import autograd_hessian, autograd_jacobian
from strategies import separated_matrix

DT = torch.float64
SHAPES = [(5, 9), (9, 5), (6, 6), (1, 7), (7, 1)]
ROUTES = ["svd", "svd-gram", "fast", "batched-svd", "batched-fast"]
N_TRAJ = 3


def weights(shape, seed):
    return torch.stack([separated_matrix(*shape, seed=seed + j, min_gap=0.05) for j in range(N_TRAJ)])


def decomposition(route, Ws):
    """The route's decomposition of Ws (n, m, k): batched routes take all, the others the first."""
    if route == "svd":
        return decompose(Ws[0])
    if route == "svd-gram":
        return decompose(Ws[0], method="gram")
    if route == "fast":
        c = gram_curvature(Ws[0], 1e-6)
        assert c is not None
        return c
    return decompose_batched(Ws, route.split("-")[1], 1e-6)


def per_trajectory(route, x):
    """x's trajectory values: all of a batched route, the first's otherwise."""
    return x if route.startswith("batched") else x[0]


def primitive_oracle(W, g, N):
    """σ1, J = u1v1ᵀ, gap, gᵀHg, diag H · N and tr H from autograd of W ↦ σ1(W) (float64)."""
    s = torch.linalg.svdvals(W)
    H = autograd_hessian(W)
    return {
        "sigma1": float(s[0]),
        "jacobian": autograd_jacobian(W),
        "gap": float((s[0] - s[1]) / s[0]) if s.shape[0] > 1 else 1.0,
        "quadform": float(vec(g) @ H @ vec(g)),
        "diag_dot": float(torch.diagonal(H) @ vec(N)),
        "trace": float(torch.trace(H)),
    }


def terms_oracle(W, G, lr, grad, wd, s2):
    """Thm 14 (docs/theory.md §6) with dense Σ̂ and autograd J, H: every tensor field of LayerTerms."""
    M, mn = G.shape[0], W.numel()
    sv = torch.linalg.svdvals(W)
    s1 = float(sv[0])
    J = vec(autograd_jacobian(W))
    H = autograd_hessian(W)
    E = vec(G) - vec(G).mean(0)
    sampling = E.T @ E / (M * (M - 1))
    Sigma = sampling + s2 * torch.eye(mn, dtype=DT)
    gbar = vec(G).mean(0)
    kappa = lr / (2 * s1) * float(torch.trace(H @ Sigma))
    kappa_var = lr / (2 * s1) * float(torch.diagonal(H) @ torch.diagonal(Sigma))
    return {
        "sigma1": s1,
        "drift": -float(J @ vec(grad)) / s1 - wd,
        "diffusion_sq": lr / s1**2 * float(J @ Sigma @ J),
        "noise_curvature": kappa,
        "noise_curvature_var": kappa_var,
        "noise_curvature_cov": kappa - kappa_var,
        "gap": float((sv[0] - sv[1]) / sv[0]) if sv.shape[0] > 1 else 1.0,
        "step_curvature": lr / (2 * s1) * float(gbar @ H @ gbar - torch.trace(H @ sampling)),
        "diffusion_sq_var": lr / s1**2 * float((J * J) @ torch.diagonal(Sigma)),
    }


def close(got, want, rtol=1e-8, atol=1e-12):
    return math.isclose(float(got), want, rel_tol=rtol, abs_tol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("route", ROUTES)
def test_every_route_has_the_protocol_primitives(route, shape):
    """σ1, u1, v1, gap and the Hessian's quadratic forms and diagonal/trace products of each route."""
    Ws = weights(shape, seed=sum(shape))
    gen = torch.Generator().manual_seed(1)
    m, n = shape
    A = torch.randn(N_TRAJ, 4, m, n, generator=gen, dtype=DT)  # 4 matrices per trajectory
    N = torch.rand(N_TRAJ, m, n, generator=gen, dtype=DT)
    d = decomposition(route, Ws)
    assert isinstance(d, Decomposition)
    u1, v1 = d.u1, d.v1
    if not route.startswith("batched"):
        u1, v1 = u1[None], v1[None]
    Av = A @ v1[:, None, :, None]  # (n, 4, m, 1): rows E_i v1
    Atu = A.mT @ u1[:, None, :, None]
    one = d.hessian_quadform(*(per_trajectory(route, x[:, 0, :, 0]) for x in (Av, Atu)))
    rows = d.hessian_quadform_sum(*(per_trajectory(route, x[..., 0]) for x in (Av, Atu)))
    dot, trace = d.hessian_diag_dot(per_trajectory(route, N))
    trace2 = d.hessian_trace()
    for j in range(N_TRAJ if route.startswith("batched") else 1):
        pick = (lambda x: x[j]) if route.startswith("batched") else (lambda x: x)
        want = primitive_oracle(Ws[j], A[j, 0], N[j])
        assert close(pick(d.sigma1), want["sigma1"], 1e-12)
        torch.testing.assert_close(torch.outer(u1[j], v1[j]), want["jacobian"], rtol=0, atol=1e-10)
        assert close(pick(d.gap), want["gap"], 1e-9, 1e-12)
        assert close(pick(one), want["quadform"], 1e-8)
        quad_rows = sum(primitive_oracle(Ws[j], A[j, i], N[j])["quadform"] for i in range(4))
        assert close(pick(rows), quad_rows, 1e-8)
        assert close(pick(dot), want["diag_dot"], 1e-8)
        assert close(pick(trace), want["trace"], 1e-8) and close(pick(trace2), want["trace"], 1e-8)
        assert not bool(pick(d.degenerate))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("route", ROUTES)
def test_terms_from_projections_matches_the_dense_oracle_on_every_route(route, shape):
    """The one Thm 14 formula gives every field of LayerTerms on every route, batched ones per trajectory."""
    Ws = weights(shape, seed=7 * sum(shape))
    gen = torch.Generator().manual_seed(2)
    M, lr, wd, s2 = 6, 0.1, 0.01, 0.003
    G = torch.randn(N_TRAJ, M, *shape, generator=gen, dtype=DT) + torch.randn(N_TRAJ, 1, *shape, generator=gen,
                                                                               dtype=DT)
    grad = torch.randn(N_TRAJ, *shape, generator=gen, dtype=DT)
    d = decomposition(route, Ws)
    batched = route.startswith("batched")
    u1, v1 = (d.u1, d.v1) if batched else (d.u1[None], d.v1[None])
    Gv = (G @ v1[:, None, :, None])[..., 0]
    Gtu = (G.mT @ u1[:, None, :, None])[..., 0]
    grad_proj = torch.einsum("na,nab,nb->n", u1, grad[: u1.shape[0]], v1)
    E = G - G.mean(1, keepdim=True)
    noise_var = (E * E).sum(1) / (M * (M - 1))  # diag Σ̂ per trajectory, (n, m, k)
    t = terms_from_projections(d, per_trajectory(route, Gv), per_trajectory(route, Gtu), lr,
                               grad_proj=per_trajectory(route, grad_proj), noise_var=per_trajectory(route, noise_var),
                               weight_decay=wd, extra_noise_var=s2, diffusion_split=True)
    assert isinstance(t, LayerTerms)
    fields = {f.name for f in attrs.fields(LayerTerms)} - {"degenerate"}
    for j in range(N_TRAJ if batched else 1):
        want = terms_oracle(Ws[j], G[j], lr, grad[j], wd, s2)
        assert set(want) == fields, "a LayerTerms field without an oracle: extend terms_oracle"
        for name in fields:
            got = getattr(t, name)
            got = got[j] if batched else got
            assert close(got, want[name], 1e-8, 1e-12 * max(abs(v) for v in want.values())), (route, name, j)
    assert not bool(torch.as_tensor(t.degenerate).any())


@pytest.mark.parametrize("route", ["svd", "fast"])
def test_batched_terms_flag_a_degenerate_trajectory(route):
    """A trajectory whose σ1 is (nearly) repeated is flagged per trajectory; the others are not."""
    gen = torch.Generator().manual_seed(4)
    W = torch.stack([separated_matrix(6, 5, seed=j) for j in range(3)])
    W[1] = 0.0
    W[1, :5] = torch.diag(torch.tensor([2.0, 2.0 - 1e-9, 1.0, 0.5, 0.2], dtype=DT))  # relative gap 5e-10
    b = decompose_batched(W, route, 1e-6)
    G = torch.randn(3, 4, 6, 5, generator=gen, dtype=DT)
    t = terms_from_projections(b, (G @ b.v1[:, None, :, None])[..., 0], (G.mT @ b.u1[:, None, :, None])[..., 0], 0.1)
    assert t.degenerate.tolist() == [False, True, False]
    for j in range(3):
        one = decompose(W[j], gap_tol=1e-6, on_degenerate="ignore")
        assert one.degenerate == bool(t.degenerate[j])
