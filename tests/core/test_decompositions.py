"""The decomposition routes of sdelip.core.decompositions (the Gram resolvent, docs/theory.md §5) against the
thin-SVD route of sdelip.core.spectral, per layer and batched over trajectories (float64)."""

import pytest
import torch

from sdelip.core.formulas import terms_from_projections
from sdelip.core.spectral import decompose

from oracles import rel_close

DT = torch.float64


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6), (1, 7), (7, 1), (30, 50), (50, 30)])
def test_fast_curvature_equals_the_svd_route(shape):
    """The resolvent formulas of sdelip.core.decompositions reproduce Lemma 13 via sdelip.core.spectral."""
    from sdelip.core.decompositions import gram_curvature

    torch.manual_seed(sum(shape))
    m, n = shape
    W = torch.randn(m, n, dtype=DT)
    G = torch.randn(8, m, n, dtype=DT)
    N = torch.rand(m, n, dtype=DT)
    d = decompose(W)
    c = gram_curvature(W, 1e-6)
    assert c is not None and float(c.sigma1) == pytest.approx(float(d.sigma1), rel=1e-14)
    a = terms_from_projections(d, G @ d.v1, G.mT @ d.u1, 0.1, noise_var=N, weight_decay=0.01, extra_noise_var=0.003)
    b = terms_from_projections(c, G @ c.v1, G.mT @ c.u1, 0.1, noise_var=N, weight_decay=0.01, extra_noise_var=0.003)
    for q in ("sigma1", "drift", "diffusion_sq", "noise_curvature", "noise_curvature_var", "noise_curvature_cov", "gap",
              "step_curvature"):
        assert rel_close(float(getattr(a, q)), float(getattr(b, q)), 1e-11), (q, float(getattr(a, q)), float(getattr(b, q)))
    # a repeated top singular value is left to the SVD route (which clamps and flags it)
    Wd = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=DT))
    assert gram_curvature(Wd, 1e-6) is None


@pytest.mark.parametrize("route", ["svd", "fast"])
def test_batched_decomposition_is_the_per_layer_one_with_its_gap_tolerance(route):
    """decompose_batched (the SDE path) gives per trajectory the per-layer decomposition's terms and
    Hessian quadratic form, with the gap tolerance it was given (a near-degenerate σ1 makes it matter)."""
    from sdelip.core.decompositions import decompose_batched
    from sdelip.core.spectral import decompose

    gen = torch.Generator().manual_seed(3)
    n, m, k, M, tol = 3, 6, 5, 4, 1e-2
    U, _ = torch.linalg.qr(torch.randn(n, m, m, generator=gen, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(n, k, k, generator=gen, dtype=DT))
    S = torch.tensor([2.0, 2.0 - 1e-4, 1.0, 0.5, 0.2], dtype=DT).expand(n, k)  # relative gap 5e-5 < tol
    W = U[..., :k] @ torch.diag_embed(S) @ V.mT
    b = decompose_batched(W, route, tol)
    Gv, Gtu = torch.randn(n, M, m, generator=gen, dtype=DT), torch.randn(n, M, k, generator=gen, dtype=DT)
    a, c = torch.randn(n, m, generator=gen, dtype=DT), torch.randn(n, k, generator=gen, dtype=DT)
    tb = terms_from_projections(b, Gv, Gtu, 0.1)
    quad = b.hessian_quadform(a, c)
    for j in range(n):
        d = decompose(W[j], gap_tol=tol, on_degenerate="ignore")
        t = terms_from_projections(d, Gv[j], Gtu[j], 0.1)
        for q in ("sigma1", "drift", "diffusion_sq", "noise_curvature", "step_curvature"):
            torch.testing.assert_close(getattr(tb, q)[j], getattr(t, q), rtol=1e-9, atol=0)
        assert bool(tb.degenerate[j]) == t.degenerate
        torch.testing.assert_close(quad[j], d.hessian_quadform(a[j], c[j]), rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,transposed", [((300, 400), False), ((400, 300), True), ((40, 50), False)])
def test_gram_matrix_equals_the_matrix_product(dtype, shape, transposed):
    """The symmetric rank-k update (half the flops) gives θθᵀ, mirrored exactly, for both memory layouts."""
    from sdelip.core.decompositions import SYRK_MIN_WORK, gram_matrix

    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=dtype)
    th = W.mT if transposed else W  # a column-major view, or a row-major matrix
    if th.shape[0] > th.shape[1]:
        th = th.mT
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the symmetric update runs on one thread only (gram_matrix)
    try:
        G, ref = gram_matrix(th), th.double() @ th.double().mT
    finally:
        torch.set_num_threads(threads)
    syrk = th.shape[0] ** 2 * th.shape[1] >= SYRK_MIN_WORK
    assert G.dtype == dtype and G.shape == ref.shape and (torch.equal(G, G.mT) or not syrk)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(G.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    assert syrk == (shape[0] >= 300)  # both routes are exercised
