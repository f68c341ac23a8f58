"""Layer-wise gradient noise from per-sample gradients (Sec 3–4, Eq. 2, Prop 5, 6, 7).

Σ = Var[vec ∇L(θ; ξ)] = (1/M) Var[vec g] is the covariance of the mini-batch gradient
(Eq. 2). Prop 5 estimates it without bias from the M per-sample gradients g_i of one
mini-batch as Σ̂ = ΩᵀΩ/M, where row i of Ω (M × mn) is vec(g_i − ḡ)ᵀ/√(M − 1).

:class:`GradientNoise` keeps Ω and never forms the mn × mn matrix Σ̂ unless asked
(:meth:`GradientNoise.cov`, for tests on small layers).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_directions, check_per_sample
from .spectral import unvec, vec

__all__ = ["GradientNoise"]


class GradientNoise:
    """The Prop 5 estimator of the mini-batch gradient covariance Σ of one layer.

    Build it with :meth:`from_per_sample`. Column-major vec throughout (docs/theory.md §1).

    Attributes:
        omega: Ω of Prop 5, shape (M, m·n); rows sum to zero, so rank Ω ≤ M − 1.
        mean: ḡ, the mini-batch mean gradient, shape (m, n).
        shape: (m, n).
    """

    def __init__(self, omega: torch.Tensor, mean: torch.Tensor, shape: tuple[int, int]):
        self.omega = omega
        self.mean = mean
        self.shape = (int(shape[0]), int(shape[1]))

    @classmethod
    def from_per_sample(cls, G: torch.Tensor, name: Optional[str] = None) -> "GradientNoise":
        """Estimator from per-sample gradients G of shape (M, m, n) (Prop 5, Eq. 4).

        Args:
            G: g_i = ∇_θ ℓ(θ; x_i, y_i) for the M samples of one mini-batch.
            name: layer name for error messages.

        Raises:
            ValueError: M < 2 (the unbiased estimator divides by M − 1).
        """
        check_per_sample(G, name)
        M, m, n = G.shape
        mean = G.mean(0)
        omega = vec(G - mean) / (M - 1) ** 0.5
        return cls(omega, mean, (m, n))

    @property
    def batch_size(self) -> int:
        """M, the number of samples behind the estimate."""
        return self.omega.shape[0]

    def cov(self) -> torch.Tensor:
        """Dense Σ̂ = ΩᵀΩ/M, shape (mn, mn), column-major (Prop 5). Small layers only."""
        return self.omega.mT @ self.omega / self.batch_size

    def var(self) -> torch.Tensor:
        """diag Σ̂ = colsum(Ω ∘ Ω)/M as an m×n matrix (Prop 6, the variance part)."""
        d = (self.omega * self.omega).sum(0) / self.batch_size
        return unvec(d, *self.shape)

    def cov_offdiag(self) -> torch.Tensor:
        """Σ̂ − diag Σ̂, the covariance part of Prop 6 (dense; not PSD in general)."""
        C = self.cov()
        return C - torch.diag(torch.diagonal(C))

    def factor(self) -> torch.Tensor:
        """The exact low-rank factor Ωᵀ/√M (mn × M) with factor·factorᵀ = Σ̂ (docs/theory.md §3).

        Driven by an M-dimensional Brownian motion it gives the same SDE in law as the
        symmetric root of Prop 7, with no decomposition at all.
        """
        return self.omega.mT / self.batch_size**0.5

    def sqrt(self, rtol: Optional[float] = None) -> torch.Tensor:
        """The symmetric PSD square root of Σ̂ by Prop 7, shape (mn, mn).

        Prop 7 writes Σ̂^{1/2} = (ΩᵀU/√M) Λ^{-1/2} (ΩᵀU/√M)ᵀ with (Λ, U) the eigenpairs of
        ΩΩᵀ/M (M × M). Ω has rank ≤ M − 1, so at least one eigenvalue is numerically
        zero: eigenvalues at or below ``rtol``·λ_max are dropped, not inverted, which
        returns exactly V_r Λ_r^{1/2} V_rᵀ, the PSD root on the range of Σ̂ (docs/theory.md §3).

        Args:
            rtol: relative eigenvalue tolerance; default M·eps(dtype)·10.
        """
        M = self.batch_size
        gram = self.omega @ self.omega.mT / M
        lam, Uq = torch.linalg.eigh(gram)
        if rtol is None:
            rtol = 10 * M * torch.finfo(gram.dtype).eps
        keep = lam > rtol * lam.max().clamp_min(torch.finfo(gram.dtype).tiny)
        lam, Uq = lam[keep], Uq[:, keep]
        P = self.omega.mT @ Uq / M**0.5  # (mn, r) = V_r Λ_r^{1/2}
        return (P * lam.rsqrt()) @ P.mT

    def quadform(self, A: torch.Tensor) -> torch.Tensor:
        """vec(A)ᵀ Σ̂ vec(A) = (1/M) ‖Ω vec(A)‖² for m×n A (or a batch (..., m, n))."""
        check_directions(A, self.shape, "A")
        proj = vec(A) @ self.omega.mT  # (..., M)
        return (proj * proj).sum(-1) / self.batch_size

    def __repr__(self) -> str:
        return f"GradientNoise(M={self.batch_size}, shape={self.shape}, dtype={self.omega.dtype})"
