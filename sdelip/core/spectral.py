"""Operator-norm derivatives of a weight matrix (Prop 9, Lemma 12, Lemma 13, Assumption 11).

For a weight matrix θ ∈ R^{m×n} with thin SVD θ = U S Vᵀ (p = min(m, n)), the operator
norm is σ1 (Prop 9). Its Jacobian with respect to vec θ (column-major) is v1 ⊗ u1
(Lemma 12) and its Hessian is a PSD mn×mn matrix (Lemma 13). Everything here except
:func:`opnorm_hessian` works matrix-free from one thin decomposition of θ; the
Hessian appears only through its quadratic form and its diagonal (docs/theory.md §5).

Conventions: ``vec`` is column-major, vec(u vᵀ) = v ⊗ u; in row-major torch that is
``A.mT.reshape(-1)`` (see :func:`vec`).
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from .._checks import check_directions, check_gap, check_matrix

__all__ = [
    "SpectralDecomposition",
    "decompose",
    "top_singular",
    "spectral_gap",
    "opnorm_jacobian",
    "opnorm_hessian",
    "opnorm_hessian_quadform",
    "opnorm_hessian_diag",
    "hessian_quadform_from_projections",
    "weight_matrix",
    "vec",
    "unvec",
]

#: Default relative-gap tolerance below which σ1 counts as degenerate.
DEFAULT_GAP_TOL = 1e-6


def vec(A: torch.Tensor) -> torch.Tensor:
    """Column-major vectorisation of the last two axes: (..., m, n) → (..., m·n)."""
    return A.mT.reshape(*A.shape[:-2], -1)


def unvec(v: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Inverse of :func:`vec`: (..., m·n) → (..., m, n)."""
    return v.reshape(*v.shape[:-1], n, m).mT


def weight_matrix(weight: torch.Tensor | torch.nn.Module) -> torch.Tensor:
    """The parameter matrix θ of a Linear or Conv layer (Sec 2, Prop 9).

    A Linear weight (out, in) is returned as is; a ConvNd weight (out, in, *kernel) is
    reshaped to (out, in·prod(kernel)), the "reshaped kernel" whose rows are the
    filters. The result is a view: gradients flow back to the module's weight.

    Args:
        weight: a weight tensor, or a module with a ``weight`` attribute.
    """
    if isinstance(weight, torch.nn.Module):
        if not isinstance(getattr(weight, "weight", None), torch.Tensor):
            raise TypeError(f"module {type(weight).__name__} has no weight tensor")
        weight = weight.weight
    if weight.ndim < 2:
        raise ValueError(f"a weight matrix needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


@attrs.frozen
class SpectralDecomposition:
    """A thin SVD θ = U diag(S) Vᵀ with singular values in descending order.

    Implements :class:`sdelip.core.decompositions.Decomposition` (the primitives that
    :func:`sdelip.core.formulas.terms_from_projections` consumes).

    Attributes:
        U: (m, p) left singular vectors.
        S: (p,) singular values, descending.
        V: (n, p) right singular vectors.
        gap_tol: relative-gap tolerance used when forming the Hessian weights.
        degenerate: True when the relative gap (σ1 − σ2)/σ1 is below ``gap_tol``.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    gap_tol: float = DEFAULT_GAP_TOL
    degenerate: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[0])

    @property
    def sigma1(self) -> torch.Tensor:
        """The operator norm σ1 = ‖θ‖_op (Prop 9)."""
        return self.S[0]

    @property
    def u1(self) -> torch.Tensor:
        return self.U[:, 0]

    @property
    def v1(self) -> torch.Tensor:
        return self.V[:, 0]

    @property
    def gap(self) -> torch.Tensor:
        """Relative spectral gap (σ1 − σ2)/σ1; 1 for a matrix with a single singular value."""
        if self.S.shape[0] < 2:
            return torch.ones((), dtype=self.S.dtype, device=self.S.device)
        return (self.S[0] - self.S[1]) / self.S[0]

    def hessian_quadform(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """gᵀ H g of one matrix g from a = g v1 and b = gᵀ u1 (Lemma 13)."""
        return hessian_quadform_from_projections(self, a, b)

    def hessian_quadform_sum(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Σ_i vec(E_i)ᵀ H vec(E_i) from the rows A_i = E_i v1 (M, m) and B_i = E_iᵀ u1 (M, n) (Lemma 13)."""
        return hessian_quadform_from_projections(self, A, B).sum()

    def hessian_diag_dot(self, N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(⟨diag H, N⟩, tr H) for an (m × n) matrix N, from the diagonal D of :func:`opnorm_hessian_diag`."""
        D = opnorm_hessian_diag(self)
        return (D * N).sum(), D.sum()

    def hessian_trace(self) -> torch.Tensor:
        """tr H, the sum of the diagonal of :func:`opnorm_hessian_diag` (Lemma 13)."""
        return opnorm_hessian_diag(self).sum()

    def hessian_weights(self) -> torch.Tensor:
        """w_k = 1/(σ1² − σk²) for k ≥ 2 and w_1 = 0 (Lemma 13), shape (p,).

        Denominators are clamped at σ1²·(1 − (1 − gap_tol)²) so that a degenerate
        spectrum gives large finite weights (flagged by :attr:`degenerate`), never inf.
        """
        s1sq = self.S[0] ** 2
        floor = s1sq * (1.0 - (1.0 - self.gap_tol) ** 2)
        denom = torch.clamp(s1sq - self.S**2, min=floor)
        w = 1.0 / denom
        w[0] = 0.0
        return w


def decompose(
    W: torch.Tensor,
    method: str = "svd",
    gap_tol: float = DEFAULT_GAP_TOL,
    on_degenerate: str = "warn",
    name: Optional[str] = None,
    step: Optional[int] = None,
) -> SpectralDecomposition:
    """Thin decomposition of a weight matrix, checked against Assumption 11.

    Args:
        W: (m, n) weight matrix (use :func:`weight_matrix` for convolutions).
        method: ``"svd"`` (``torch.linalg.svd``, thin) or ``"gram"`` (eigendecomposition of
            the smaller Gram matrix θθᵀ or θᵀθ, faster on CPU; it squares the condition
            number, so the missing singular vectors are recovered as θᵀU/S and
            re-orthonormalised; use it for well-conditioned layers only).
        gap_tol: relative gap (σ1 − σ2)/σ1 below which σ1 is degenerate.
        on_degenerate: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
        name: layer name, used in messages.
        step: training step, used in messages.

    Returns:
        A :class:`SpectralDecomposition`.

    Raises:
        DegenerateSpectrumError: σ1 = 0, or a degenerate gap with ``on_degenerate="raise"``.
    """
    check_matrix(W, name=name)
    W = W.detach()
    if method == "svd":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        V = Vh.mT
    elif method == "gram":
        U, S, V = _gram_svd(W)
    else:
        raise ValueError(f"method must be 'svd' or 'gram', got {method!r}")
    sigma1 = float(S[0])
    gap = float((S[0] - S[1]) / S[0]) if S.shape[0] > 1 and sigma1 > 0 else 1.0
    degenerate = check_gap(sigma1, gap, gap_tol, on_degenerate, name=name, step=step)
    return SpectralDecomposition(U=U, S=S, V=V, gap_tol=gap_tol, degenerate=degenerate)


def _gram_svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = W.shape
    if m <= n:
        evals, U = torch.linalg.eigh(W @ W.mT)
        evals, U = evals.flip(-1), U.flip(-1)
        S = evals.clamp_min(0).sqrt()
        V = W.mT @ U
        V, _ = _orthonormalise(V, S)
    else:
        evals, V = torch.linalg.eigh(W.mT @ W)
        evals, V = evals.flip(-1), V.flip(-1)
        S = evals.clamp_min(0).sqrt()
        U = W @ V
        U, _ = _orthonormalise(U, S)
    return U, S, V


def _orthonormalise(B: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # B = Q diag(S) up to rounding; a QR with sign fix recovers Q even where S is tiny.
    Q, R = torch.linalg.qr(B)
    sign = torch.sign(torch.diagonal(R))
    sign[sign == 0] = 1
    return Q * sign, R


def top_singular(W: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top singular triple (σ1, u1, v1) of W (Prop 9: ‖θ‖_op = σ1).

    Keyword arguments are passed to :func:`decompose`.
    """
    d = decompose(W, **kwargs)
    return d.sigma1, d.u1, d.v1


def spectral_gap(W: torch.Tensor, **kwargs) -> torch.Tensor:
    """Relative spectral gap (σ1 − σ2)/σ1 of W (Assumption 11, Sec 8.1 iv)."""
    kwargs.setdefault("on_degenerate", "ignore")
    return decompose(W, **kwargs).gap


def _as_decomposition(W, **kwargs) -> SpectralDecomposition:
    return W if isinstance(W, SpectralDecomposition) else decompose(W, **kwargs)


def opnorm_jacobian(W, **kwargs) -> torch.Tensor:
    """Operator-norm Jacobian J = v1 ⊗ u1 (Lemma 12), returned as the m×n matrix u1 v1ᵀ.

    ``vec(opnorm_jacobian(W))`` is the column-major vector v1 ⊗ u1, and
    ⟨J, vec A⟩ = u1ᵀ A v1.

    Args:
        W: (m, n) weight matrix or a :class:`SpectralDecomposition`.
    """
    d = _as_decomposition(W, **kwargs)
    return torch.outer(d.u1, d.v1)


def hessian_quadform_from_projections(
    d: SpectralDecomposition, Ev1: torch.Tensor, Etu1: torch.Tensor
) -> torch.Tensor:
    """vec(E)ᵀ H vec(E) from the two projections E v1 and Eᵀ u1 (Lemma 13, docs/theory.md §5).

    With a_k = u_kᵀ E v1, b_k = u1ᵀ E v_k and w_k = 1/(σ1² − σk²):

        Σ_{k≥2} w_k [σ1 (a_k² + b_k²) + 2 σ_k a_k b_k]
        + (‖E v1‖² − Σ_k a_k²)/σ1 + (‖Eᵀ u1‖² − Σ_k b_k²)/σ1,

    the last two being the null-space directions that appear when m ≠ n.

    Args:
        d: decomposition of θ.
        Ev1: (..., m) the products E v1.
        Etu1: (..., n) the products Eᵀ u1.

    Returns:
        (...,) quadratic forms.
    """
    s1 = d.S[0]
    w = d.hessian_weights()
    a = Ev1 @ d.U  # (..., p)
    b = Etu1 @ d.V
    paired = (w * (s1 * (a * a + b * b) + 2.0 * d.S * a * b)).sum(-1)
    null_left = ((Ev1 * Ev1).sum(-1) - (a * a).sum(-1)).clamp_min(0.0)
    null_right = ((Etu1 * Etu1).sum(-1) - (b * b).sum(-1)).clamp_min(0.0)
    return paired + (null_left + null_right) / s1


def opnorm_hessian_quadform(W, E: torch.Tensor, **kwargs) -> torch.Tensor:
    """Matrix-free quadratic form vec(E)ᵀ H vec(E) of the operator-norm Hessian (Lemma 13).

    Uses one thin decomposition of W and never forms H; includes the null-space terms
    of rectangular layers (docs/theory.md §5).

    Args:
        W: (m, n) weight matrix or a :class:`SpectralDecomposition`.
        E: directions of shape (..., m, n).

    Returns:
        Tensor of shape E.shape[:-2].
    """
    d = _as_decomposition(W, **kwargs)
    check_directions(E, d.shape)
    Ev1 = E @ d.v1
    Etu1 = E.mT @ d.u1
    return hessian_quadform_from_projections(d, Ev1, Etu1)


def opnorm_hessian_diag(W, **kwargs) -> torch.Tensor:
    """Diagonal of the operator-norm Hessian as an m×n matrix (Lemma 13, docs/theory.md §5).

    Entry (i, j) is H at the column-major index of θ_ij. Cost O(mnp), no mn×mn matrix:

        D = σ1 ((U∘U) w)(v1∘v1)ᵀ + σ1 (u1∘u1)((V∘V) w)ᵀ + 2 (u1 v1ᵀ)∘(U diag(S∘w) Vᵀ)
            + [(1 − rowsum(U∘U))(v1∘v1)ᵀ + (u1∘u1)(1 − rowsum(V∘V))ᵀ] / σ1

    Args:
        W: (m, n) weight matrix or a :class:`SpectralDecomposition`.
    """
    d = _as_decomposition(W, **kwargs)
    U, S, V = d.U, d.S, d.V
    s1, u1, v1 = S[0], U[:, 0], V[:, 0]
    w = d.hessian_weights()
    UU, VV = U * U, V * V
    u1sq, v1sq = u1 * u1, v1 * v1
    D = s1 * torch.outer(UU @ w, v1sq) + s1 * torch.outer(u1sq, VV @ w)
    D = D + 2.0 * torch.outer(u1, v1) * ((U * (S * w)) @ V.mT)
    null_left = (1.0 - UU.sum(-1)).clamp_min(0.0)
    null_right = (1.0 - VV.sum(-1)).clamp_min(0.0)
    D = D + (torch.outer(null_left, v1sq) + torch.outer(u1sq, null_right)) / s1
    return D


def opnorm_hessian(W, **kwargs) -> torch.Tensor:
    """Dense operator-norm Hessian H (mn × mn, column-major vec), Lemma 13.

    H = H_L + H_R + H_C including the null-space directions of rectangular matrices.
    Memory O(m²n²): for small matrices, tests and teaching only; use
    :func:`opnorm_hessian_quadform` or :func:`opnorm_hessian_diag` otherwise.

    Args:
        W: (m, n) weight matrix or a :class:`SpectralDecomposition`.
    """
    d = _as_decomposition(W, **kwargs)
    m, n = d.shape
    U, S, V = d.U, d.S, d.V
    s1, u1, v1 = S[0], U[:, 0], V[:, 0]
    w = d.hessian_weights()
    Im = torch.eye(m, dtype=U.dtype, device=U.device)
    In = torch.eye(n, dtype=U.dtype, device=U.device)
    # Linear maps vec(E) ↦ a = Uᵀ E v1, b = Vᵀ Eᵀ u1, E v1, Eᵀ u1 (rows are their covectors).
    A = torch.kron(v1[None, :], U.mT.contiguous())  # (p, mn): row k = v1 ⊗ u_k
    B = torch.kron(V.mT.contiguous(), u1[None, :])  # (p, mn): row k = v_k ⊗ u1
    P = torch.kron(v1[None, :], Im)  # (m, mn)
    Q = torch.kron(In, u1[None, :])  # (n, mn)
    H = A.mT @ ((s1 * w)[:, None] * A) + B.mT @ ((s1 * w)[:, None] * B)
    C = A.mT @ ((S * w)[:, None] * B)
    H = H + C + C.mT
    H = H + (P.mT @ P - A.mT @ A + Q.mT @ Q - B.mT @ B) / s1
    return 0.5 * (H + H.mT)
