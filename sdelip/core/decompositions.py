"""The decomposition protocol, and fast operator-norm curvature of one layer from its smaller Gram matrix.

Every decomposition of a layer exposes the primitives of :class:`Decomposition` (a
``typing.Protocol``): σ1, u1, v1, the gap, the degenerate flag, the Hessian's quadratic
forms (of one matrix and summed over rows) and its diagonal/trace products. The one Thm 14
formula, :func:`sdelip.core.formulas.terms_from_projections`, consumes only these, on every
route: :class:`sdelip.core.spectral.SpectralDecomposition` (thin SVD), :class:`GramCurvature`
(this module) and :class:`BatchedDecomposition` (one layer over a batch of SDE trajectories,
every primitive with a leading trajectory axis). :func:`decompose_layer` picks the route of one
weight matrix, :func:`decompose_batched` that of a batch.

The Thm 14 terms need, besides σ1, u1, v1, the operator-norm Hessian H (Lemma 13) only
through the quadratic forms vec(E_i)ᵀ H vec(E_i) and, for the Prop 6 split, ⟨diag H, diag Σ̂⟩.
:mod:`sdelip.core.spectral` evaluates both from a full thin SVD θ = U S Vᵀ. This module
evaluates the same numbers from the resolvent of the smaller Gram matrix, which on a CPU
is several times cheaper than the SVD (docs/theory.md §5; timings in docs/performance.md).

Orient θ so that m ≤ n (transpose otherwise: σ1 and H are invariant, u ↔ v), let
G = θθᵀ (m × m), λ1 = σ1², and

    R = Σ_{k≥2} u_k u_kᵀ / (σ1² − σ_k²) = (λ1 I − G + λ1 u1u1ᵀ)⁻¹ − u1u1ᵀ/λ1,

the pseudo-inverse of λ1 I − G on the complement of u1 (one Cholesky factorisation of an
SPD matrix and its inverse; the explicit inverse followed by a matrix product rather than
triangular solves with n right-hand sides, see docs/performance.md). With a_k = u_kᵀ E v1 and c_k = u_kᵀ θ Eᵀ u1 = σ_k b_k, Lemma 13's quadratic
form (docs/theory.md §5, null-space directions included) regroups, term by term, into

    vec(E)ᵀ H vec(E) = (1/σ1) [ yᵀ R y + ‖Eᵀu1‖² − (v1 · Eᵀu1)² ],   y = σ1 E v1 + θ Eᵀ u1,

and docs/theory.md §5's diagonal D into

    D = σ1 diag(R) (v1∘v1)ᵀ + (u1∘u1) rᵀ + 2 (u1 v1ᵀ) ∘ (Rθ),
    r = (1 − v1∘v1 + colsum(θ ∘ Rθ)) / σ1,          tr H = σ1 tr R + Σ r,

which use neither V nor the small singular values. Only λ1, λ2 and u1 come from an
eigensolver (the two largest eigenpairs of G). A degenerate spectrum (relative gap below
the tolerance, Assumption 11) or a failed factorisation falls back to the SVD route of
:mod:`sdelip.core.spectral`, which clamps the gap and flags it.

The tests check that both routes give the same terms.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Protocol, runtime_checkable

import attrs
import numpy as np
import torch
from torch.func import vmap

from .spectral import DEFAULT_GAP_TOL, SpectralDecomposition, decompose

__all__ = ["Decomposition", "GramCurvature", "gram_curvature", "gram_matrix", "top_eigenpairs", "decompose_layer",
           "DECOMPOSITIONS", "BatchedDecomposition", "decompose_batched"]


@runtime_checkable
class Decomposition(Protocol):
    """The primitives of one layer's decomposition θ ↦ (σ1, u1, v1, H) that the Thm 14 terms consume.

    Implemented by :class:`~sdelip.core.spectral.SpectralDecomposition`, :class:`GramCurvature`
    and, with a leading trajectory axis on every value, :class:`BatchedDecomposition`. Vectors
    and matrices are in the orientation of the original θ (m × n); H is the operator-norm
    Hessian of Lemma 13 (null-space directions of a rectangular θ included, docs/theory.md §5).

    Attributes:
        sigma1: σ1 = ‖θ‖_op (Prop 9).
        u1, v1: the top left (m,) and right (n,) singular vectors.
        gap: the relative spectral gap (σ1 − σ2)/σ1 (Assumption 11).
        degenerate: True when the gap was below tolerance and H's weights were clamped.
    """

    sigma1: torch.Tensor
    u1: torch.Tensor
    v1: torch.Tensor
    gap: torch.Tensor
    degenerate: bool

    def hessian_quadform(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """gᵀ H g of one matrix g from a = g v1 (m,) and b = gᵀ u1 (n,) (Lemma 13)."""

    def hessian_quadform_sum(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Σ_i vec(E_i)ᵀ H vec(E_i) from the rows A_i = E_i v1 (M, m) and B_i = E_iᵀ u1 (M, n)."""

    def hessian_diag_dot(self, N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(⟨diag H, N⟩, tr H) for an (m × n) matrix N (the Prop 6 split, Sec 8.4 noise)."""

    def hessian_trace(self) -> torch.Tensor:
        """tr H."""

#: The decomposition routes of :func:`decompose_layer`.
DECOMPOSITIONS = ("fast", "svd", "gram")

try:  # LAPACK's MRRR solver computes only the eigenpairs asked for
    import scipy.linalg as _sl
except Exception:  # pragma: no cover - scipy is a dependency of torchsde
    _sl = None

_SCIPY_BLAS = None  # threadpoolctl controllers of the BLAS libraries scipy.linalg uses


def _scipy_blas_controllers():
    """The OpenBLAS/MKL controllers of scipy's LAPACK (found once), or () without threadpoolctl."""
    global _SCIPY_BLAS
    if _SCIPY_BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            ctl = ThreadpoolController()
            _SCIPY_BLAS = tuple(
                c for c in ctl.select(user_api="blas").lib_controllers
                if "scipy" in c.filepath and "64_" not in c.filepath.rsplit("/", 1)[-1]
            )
        except Exception:  # pragma: no cover - threadpoolctl missing or unusable
            _SCIPY_BLAS = ()
    return _SCIPY_BLAS


def top_eigenpairs(G: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenvalues (descending) and eigenvectors (columns) of a symmetric G.

    On CPU, LAPACK's MRRR driver (``scipy.linalg.eigh(..., driver="evr")``) computes only
    those k pairs, single-threaded: the tridiagonal reduction of a matrix this small gains
    nothing from threads, and busy-waiting BLAS threads on a shared machine can make it a
    hundred times slower (docs/performance.md, "Threads").
    """
    m = G.shape[0]
    k = min(k, m)
    if _sl is not None and G.device.type == "cpu" and m > 2 * k:
        ctls = _scipy_blas_controllers()
        old = [c.num_threads for c in ctls]
        for c in ctls:
            c.set_num_threads(1)
        try:
            w, Z = _sl.eigh(G.numpy(), subset_by_index=[m - k, m - 1], driver="evr", check_finite=False)
        finally:
            for c, n in zip(ctls, old):
                c.set_num_threads(n)
        return torch.from_numpy(w.copy()).flip(0), torch.from_numpy(Z.copy()).flip(1)
    w, Z = torch.linalg.eigh(G)
    return w[-k:].flip(0), Z[:, -k:].flip(1)


#: :func:`gram_matrix` uses BLAS's symmetric rank-k update for an oriented (m × n) θ with m²n at least
#: this (below, the matrix product costs less than the wrapper: 128 × 512, one thread, 0.21 ms either way).
SYRK_MIN_WORK = 2**24


def gram_matrix(th: torch.Tensor) -> torch.Tensor:
    """G = θθᵀ (m × m) of a real (m × n) θ.

    On CPU in float32/float64, BLAS's symmetric rank-k update (``?syrk`` through
    ``scipy.linalg.blas``) computes one triangle only, half the flops of the matrix product
    (512 × 4608, one thread: 30 ms against 57 ms; docs/performance.md, issue #30), which is
    then mirrored (G symmetric to the last bit). Only when torch runs on one thread: with two,
    scipy's threaded ``?syrk`` was 1.2–4× *slower* than torch's threaded product on this
    machine (512 × 784: 11–12 ms against 4.1–4.5 ms; docs/performance.md). Elsewhere, and
    below :data:`SYRK_MIN_WORK`: ``th @ th.mT``.
    """
    m = th.shape[0]
    if (_sl is None or th.device.type != "cpu" or th.dtype not in (torch.float32, torch.float64)
            or m * m * th.shape[1] < SYRK_MIN_WORK or th.requires_grad or torch.get_num_threads() != 1):
        return th @ th.mT
    from scipy.linalg import blas

    syrk = blas.ssyrk if th.dtype == torch.float32 else blas.dsyrk
    a = th.numpy()
    if a.flags.f_contiguous:  # a transposed view of a row-major weight: C = a aᵀ, no copy
        trans = 0
    else:  # row-major (m × n): its transpose (n × m) is column-major, C = (aᵀ)ᵀ aᵀ
        trans, a = 1, np.ascontiguousarray(a).T
    ctls = _scipy_blas_controllers()
    old = [c.num_threads for c in ctls]
    for c in ctls:
        c.set_num_threads(1)
    try:
        C = torch.from_numpy(syrk(1.0, a, trans=trans, lower=0))  # upper triangle (column-major), lower zeros
    finally:
        for c, n in zip(ctls, old):
            c.set_num_threads(n)
    G = C.triu(1).mT.add_(C)  # mirror the strict upper triangle into the lower one
    return G.contiguous()


@attrs.frozen
class GramCurvature:
    """σ1, u1, v1 and the resolvent R of one layer (see the module docstring).

    Attributes:
        sigma1: the operator norm σ1 (Prop 9).
        u1, v1: top singular vectors of the *original* θ (m0 and n0 long).
        gap: relative spectral gap (σ1 − σ2)/σ1.
        transposed: True when θ was transposed to have m ≤ n.
        theta: the oriented θ (m × n, m ≤ n).
        uo, vo: u1, v1 of the oriented θ.
        R: (m × m) the resolvent on the complement of uo.
    """

    sigma1: torch.Tensor
    u1: torch.Tensor
    v1: torch.Tensor
    gap: torch.Tensor
    transposed: bool
    theta: torch.Tensor
    uo: torch.Tensor
    vo: torch.Tensor
    R: torch.Tensor
    degenerate: bool = False

    def hessian_quadform_sum(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Σ_i vec(E_i)ᵀ H vec(E_i) for rows A_i = E_i v1, B_i = E_iᵀ u1 (original orientation)."""
        return self._oriented_quadform_sum(*((B, A) if self.transposed else (A, B)))

    def _oriented_quadform_sum(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Σ_i vec(E_i)ᵀ H vec(E_i) for rows A_i = E_i v1, B_i = E_iᵀ u1 of the oriented θ."""
        s1 = self.sigma1
        Y = torch.addmm(A, B, self.theta.mT, beta=float(s1))  # σ1 A + B θᵀ
        yRy = ((Y @ self.R) * Y).sum()
        Bv = B @ self.vo
        return (yRy + (B * B).sum() - (Bv * Bv).sum()) / s1

    def hessian_diag_dot(self, N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(⟨diag H, N⟩, tr H) for an (m0 × n0) matrix N in the original orientation."""
        if self.transposed:
            N = N.mT
        s1, R, th, u, v = self.sigma1, self.R, self.theta, self.uo, self.vo
        Rth = R @ th
        r = (1.0 - v * v + (th * Rth).sum(0)) / s1
        dR = R.diagonal()
        first = s1 * (dR @ (N @ (v * v)))
        second = (u * u) @ (N @ r)
        third = 2.0 * (u @ (Rth.mul_(N) @ v))  # 2 ⟨Rθ, N ∘ u vᵀ⟩ (Rθ is not needed afterwards)
        trace = s1 * dR.sum() + r.sum()
        return first + second + third, trace

    def hessian_quadform(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """gᵀ H g of one matrix g from a = g v1 and b = gᵀ u1 (original orientation, Lemma 13)."""
        A, B = (b, a) if self.transposed else (a, b)
        return self._oriented_quadform_sum(A[None], B[None])

    def hessian_trace(self) -> torch.Tensor:
        """tr H = σ1 tr R + Σ_j r_j."""
        s1, R, th, v = self.sigma1, self.R, self.theta, self.vo
        r = (1.0 - v * v + (th * (R @ th)).sum(0)) / s1
        return s1 * R.diagonal().sum() + r.sum()


def gram_curvature(
    W: torch.Tensor,
    gap_tol: float,
    on_degenerate: str = "warn",
    name: Optional[str] = None,
    step: Optional[int] = None,
    eigenpairs: Optional[Callable] = None,
) -> Optional[GramCurvature]:
    """Build :class:`GramCurvature` for the weight matrix W (m0 × n0).

    Returns None when the spectrum is degenerate (relative gap below ``gap_tol``) or the
    factorisation fails; the caller then uses the SVD route, which handles both (and
    warns or raises according to ``on_degenerate``).

    ``eigenpairs(G)`` → (w, Z), the two largest eigenvalues (descending) and eigenvectors
    of the oriented Gram matrix G (which it must not modify), replaces
    :func:`top_eigenpairs`: the amortised route (:mod:`sdelip.core.amortised`) passes a
    warm-started solver; everything after the eigenpairs is the same computation.
    """
    W = W.detach()
    transposed = W.shape[0] > W.shape[1]
    th = W.mT if transposed else W
    G = gram_matrix(th)
    w, Z = top_eigenpairs(G, 2) if eigenpairs is None else eigenpairs(G)
    uo = Z[:, 0].to(W.dtype)
    tu = th.mT @ uo
    s1 = tu.norm()
    s1f = float(s1)
    if not (s1f > 0 and math.isfinite(s1f)):
        return None
    vo = tu / s1
    lam2 = float(w[1]) if w.shape[0] > 1 else 0.0
    s2 = math.sqrt(max(lam2, 0.0))
    gap = (s1f - s2) / s1f
    if gap < gap_tol:
        return None
    lam1 = s1 * s1
    Q = G.neg_()
    Q.diagonal().add_(lam1)
    Q.addr_(uo, uo, alpha=float(lam1))
    L, info = torch.linalg.cholesky_ex(Q)
    if int(info) != 0:
        return None
    R = torch.cholesky_inverse(L)
    R.addr_(uo, uo, alpha=-1.0 / float(lam1))
    u1, v1 = (vo, uo) if transposed else (uo, vo)
    return GramCurvature(
        sigma1=s1, u1=u1, v1=v1, gap=torch.as_tensor(gap, dtype=W.dtype), transposed=transposed, theta=th,
        uo=uo, vo=vo, R=R, degenerate=False,
    )


def decompose_layer(W: torch.Tensor, method: str = "fast", gap_tol: float = 1e-6, on_degenerate: str = "warn",
                    name: Optional[str] = None, step: Optional[int] = None):
    """The decomposition of one weight matrix by a route of :data:`DECOMPOSITIONS`.

    ``"fast"``: :func:`gram_curvature`, falling back to the SVD route for a degenerate
    spectrum or a failed factorisation (which clamps the gap, warns or raises according
    to ``on_degenerate``, and flags it); ``"svd"``: the thin SVD of
    :func:`sdelip.core.spectral.decompose`; ``"gram"``: the full eigendecomposition of the
    smaller Gram matrix. Either result has the interface of the module docstring.
    """
    if method not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {method!r}")
    d = gram_curvature(W, gap_tol) if method == "fast" else None
    if d is None:
        d = decompose(W, method="gram" if method == "gram" else "svd", gap_tol=gap_tol,
                      on_degenerate=on_degenerate, name=name, step=step)
    return d


@attrs.frozen
class BatchedDecomposition:
    """The decompositions of one layer's weight matrices over a batch of trajectories.

    The :class:`Decomposition` protocol with a leading trajectory axis on every value and
    argument: the SDE systems' route to Thm 14's terms (:mod:`sdelip.sde`), through the same
    :func:`sdelip.core.formulas.terms_from_projections` as one layer.

    Attributes:
        sigma1: (n,) σ1 (Prop 9); u1: (n, m); v1: (n, k); gap: (n,) relative gaps.
        svd: (U, S, V) batched thin SVD (route ``"svd"``), or None.
        curvature: per trajectory a :class:`GramCurvature` or, for a degenerate spectrum,
            a :class:`~sdelip.core.spectral.SpectralDecomposition` (route ``"fast"``), or None.
        gap_tol: the relative-gap tolerance of Assumption 11 (Hessian weights of the SVD route).
    """

    sigma1: torch.Tensor
    u1: torch.Tensor
    v1: torch.Tensor
    gap: torch.Tensor
    svd: Optional[tuple] = None
    curvature: Optional[list] = None
    gap_tol: float = DEFAULT_GAP_TOL

    @property
    def degenerate(self) -> torch.Tensor:
        """(n,) bool: the gap below ``gap_tol``, where the Hessian's weights are clamped (Assumption 11)."""
        if self.svd is not None:
            return self.gap < self.gap_tol
        return torch.tensor([bool(c.degenerate) for c in self.curvature])

    def per_trajectory(self, fn: Callable, *args):
        """fn(decomposition_j, *args_j) for every trajectory j, stacked along a leading axis.

        ``args`` are tensors with a leading trajectory axis, or None (passed as is). ``fn``
        returns a tensor or a tuple/dict of tensors. The SVD route maps ``fn`` with
        ``torch.func.vmap`` over one :class:`~sdelip.core.spectral.SpectralDecomposition` per
        trajectory; the Gram route calls it on each trajectory's decomposition and stacks.
        """
        if self.svd is not None:
            def one(U, S, V, *a):
                return fn(SpectralDecomposition(U=U, S=S, V=V, gap_tol=self.gap_tol), *a)

            return vmap(one, in_dims=(0, 0, 0) + tuple(None if x is None else 0 for x in args))(*self.svd, *args)
        outs = [fn(c, *(None if x is None else x[j] for x in args)) for j, c in enumerate(self.curvature)]
        first = outs[0]
        if isinstance(first, dict):
            return {k: torch.stack([o[k] for o in outs]) for k in first}
        if isinstance(first, tuple):
            return tuple(torch.stack(col) for col in zip(*outs))
        return torch.stack(outs)

    def hessian_quadform(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """gᵀ H g per trajectory (n,) from a = g v1 (n, m) and b = gᵀ u1 (n, k) (Lemma 13)."""
        return self.per_trajectory(lambda d, a, b: d.hessian_quadform(a, b), a, b)

    def hessian_quadform_sum(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Σ_i vec(E_i)ᵀ H vec(E_i) per trajectory (n,) from rows A (n, M, m) and B (n, M, k)."""
        return self.per_trajectory(lambda d, A, B: d.hessian_quadform_sum(A, B), A, B)

    def hessian_diag_dot(self, N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(⟨diag H, N⟩, tr H) per trajectory, each (n,), for N (n, m, k)."""
        return self.per_trajectory(lambda d, N: tuple(d.hessian_diag_dot(N)), N)

    def hessian_trace(self) -> torch.Tensor:
        """tr H per trajectory (n,)."""
        return self.per_trajectory(lambda d: d.hessian_trace())


def decompose_batched(W: torch.Tensor, route: str, gap_tol: float) -> BatchedDecomposition:
    """Decompose the weight matrices W (n, m, k) of one layer over n trajectories.

    ``"svd"``: one batched thin SVD; ``"fast"``: :func:`decompose_layer` per trajectory
    (the Gram route, falling back to the SVD for a degenerate spectrum, silently: the
    caller applies its own policy to the smallest gap).
    """
    if route == "svd":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        V = Vh.mT
        gap = (S[..., 0] - S[..., 1]) / S[..., 0] if S.shape[-1] > 1 else torch.ones_like(S[..., 0])
        return BatchedDecomposition(S[..., 0], U[..., 0], V[..., 0], gap, svd=(U, S, V), gap_tol=gap_tol)
    curv = [decompose_layer(Wj, "fast", gap_tol, on_degenerate="ignore") for Wj in W.detach()]
    stack = lambda f: torch.stack([f(c) for c in curv])  # noqa: E731
    return BatchedDecomposition(
        stack(lambda c: c.sigma1),
        stack(lambda c: c.u1), stack(lambda c: c.v1), stack(lambda c: torch.as_tensor(c.gap, dtype=W.dtype)),
        curvature=curv, gap_tol=gap_tol,
    )
