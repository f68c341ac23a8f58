"""Operator-norm derivatives (Lemma 12, 13) against autograd in float64."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdelip import (
    DegenerateSpectrumError,
    DegenerateSpectrumWarning,
    decompose,
    opnorm_hessian,
    opnorm_hessian_diag,
    opnorm_hessian_quadform,
    opnorm_jacobian,
    spectral_gap,
    top_singular,
    weight_matrix,
)
from sdelip.core.spectral import unvec, vec

from oracles import autograd_hessian, autograd_jacobian
from strategies import matrices, separated_matrix

SETTINGS = settings(max_examples=40, deadline=None)


def test_vec_is_column_major():
    u = torch.tensor([1.0, 2.0, 3.0])
    v = torch.tensor([5.0, 7.0])
    assert torch.equal(vec(torch.outer(u, v)), torch.kron(v, u))  # vec(u vᵀ) = v ⊗ u
    A = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(unvec(vec(A), 2, 3), A)


@SETTINGS
@given(matrices())
def test_top_singular_and_gap(W):
    s1, u1, v1 = top_singular(W)
    S = torch.linalg.svdvals(W)
    assert math.isclose(float(s1), float(S[0]), rel_tol=1e-12)
    torch.testing.assert_close(W @ v1, s1 * u1)
    torch.testing.assert_close(W.mT @ u1, s1 * v1)
    expected_gap = float((S[0] - S[1]) / S[0]) if S.numel() > 1 else 1.0
    assert math.isclose(float(spectral_gap(W)), expected_gap, rel_tol=1e-9, abs_tol=1e-12)


@SETTINGS
@given(matrices())
def test_jacobian_matches_autograd(W):
    J = opnorm_jacobian(W)
    torch.testing.assert_close(J, autograd_jacobian(W), rtol=1e-9, atol=1e-10)
    _, u1, v1 = top_singular(W)
    torch.testing.assert_close(vec(J), torch.kron(v1, u1))  # Lemma 12: J = v1 ⊗ u1


@SETTINGS
@given(matrices())
def test_dense_hessian_matches_autograd(W):
    torch.testing.assert_close(opnorm_hessian(W), autograd_hessian(W), rtol=1e-7, atol=1e-8)


@SETTINGS
@given(matrices(), st.integers(0, 2**31 - 1))
def test_quadform_and_diag_match_dense(W, seed):
    m, n = W.shape
    H = autograd_hessian(W)
    E = torch.randn(5, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = torch.einsum("bi,ij,bj->b", vec(E), H, vec(E))
    torch.testing.assert_close(opnorm_hessian_quadform(W, E), expected, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(vec(opnorm_hessian_diag(W)), torch.diagonal(H), rtol=1e-7, atol=1e-9)


@SETTINGS
@given(matrices())
def test_hessian_is_psd(W):
    H = opnorm_hessian(W)
    evals = torch.linalg.eigvalsh(H)
    assert float(evals.min()) >= -1e-9 * float(evals.abs().max().clamp_min(1.0))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (1, 4), (4, 1)])
def test_null_space_terms_are_needed_for_rectangular_layers(shape):
    """Dropping the null-space terms of docs/theory.md §5 must break agreement with autograd."""
    W = separated_matrix(*shape, seed=3)
    H = autograd_hessian(W)
    d = decompose(W)
    m, n = shape
    E = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Ev1, Etu1 = E @ d.v1, E.mT @ d.u1
    a, b = Ev1 @ d.U, Etu1 @ d.V
    w = d.hessian_weights()
    paired_only = float((w * (d.sigma1 * (a * a + b * b) + 2 * d.S * a * b)).sum())
    exact = float(vec(E) @ H @ vec(E))
    assert abs(paired_only - exact) > 1e-3 * abs(exact)
    assert math.isclose(float(opnorm_hessian_quadform(W, E)), exact, rel_tol=1e-9)


@SETTINGS
@given(matrices(min_gap=0.2))
def test_float32_agrees_with_float64(W):
    W32 = W.float()
    d64 = decompose(W)
    E = torch.randn(3, *W.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q64 = opnorm_hessian_quadform(d64, E)
    q32 = opnorm_hessian_quadform(W32, E.float()).double()
    torch.testing.assert_close(q32, q64, rtol=1e-4, atol=1e-4 * float(q64.abs().max()))
    D64 = opnorm_hessian_diag(d64)
    torch.testing.assert_close(opnorm_hessian_diag(W32).double(), D64, rtol=1e-4, atol=1e-4 * float(D64.abs().max()))
    torch.testing.assert_close(opnorm_jacobian(W32).double(), opnorm_jacobian(d64), rtol=1e-4, atol=1e-5)


@SETTINGS
@given(matrices(min_gap=0.2))
def test_gram_decomposition_agrees_with_svd(W):
    E = torch.randn(4, *W.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d_svd, d_gram = decompose(W), decompose(W, method="gram")
    torch.testing.assert_close(d_gram.S, d_svd.S, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        opnorm_hessian_quadform(d_gram, E), opnorm_hessian_quadform(d_svd, E), rtol=1e-7, atol=1e-9
    )
    torch.testing.assert_close(opnorm_hessian_diag(d_gram), opnorm_hessian_diag(d_svd), rtol=1e-7, atol=1e-9)


def test_degenerate_top_singular_value_warns_and_stays_finite():
    W = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64))
    with pytest.warns(DegenerateSpectrumWarning, match="relative gap"):
        d = decompose(W, name="fc1")
    assert d.degenerate
    E = torch.randn(3, 3, dtype=torch.float64)
    assert torch.isfinite(opnorm_hessian_quadform(d, E)).all()
    assert torch.isfinite(opnorm_hessian_diag(d)).all()
    with pytest.raises(DegenerateSpectrumError, match="fc1"):
        decompose(W, on_degenerate="raise", name="fc1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decompose(W, on_degenerate="ignore").degenerate


def test_zero_matrix_is_an_error():
    with pytest.raises(DegenerateSpectrumError, match="not differentiable"):
        decompose(torch.zeros(3, 2))


@pytest.mark.parametrize("bad", [torch.randn(3), torch.randn(2, 3, 4), torch.tensor([[1.0, float("nan")]])])
def test_bad_matrices_are_clear_errors(bad):
    with pytest.raises((ValueError, FloatingPointError)):
        decompose(bad)


def test_weight_matrix_reshapes_conv_kernels():
    conv = torch.nn.Conv2d(3, 8, kernel_size=(3, 2))
    Wm = weight_matrix(conv)
    assert Wm.shape == (8, 3 * 3 * 2)
    assert torch.equal(Wm[5], conv.weight[5].reshape(-1))
    lin = torch.nn.Linear(4, 7)
    assert weight_matrix(lin) is not None and weight_matrix(lin).shape == (7, 4)


@pytest.mark.parametrize(
    "init, s",
    [
        ("normal", lambda n: 0.05),
        ("kaiming", lambda n: math.sqrt(2.0 / n)),
        ("torch_default", lambda n: 1.0 / math.sqrt(3.0 * n)),
    ],
)
def test_random_init_operator_norm_sec_8_2(init, s):
    """Sec 8.2: iid entries of variance s² give σ1 ≈ s(√m + √n) for large m·n."""
    m, n = 400, 300
    gen = torch.Generator().manual_seed(0)
    if init == "torch_default":
        lin = torch.nn.Linear(n, m)
        W = lin.weight.detach().double()
    else:
        W = torch.randn(m, n, generator=gen, dtype=torch.float64) * s(n)
    sigma1 = float(top_singular(W)[0])
    predicted = s(n) * (math.sqrt(m) + math.sqrt(n))
    assert abs(sigma1 / predicted - 1) < 0.03
