"""Fast operator-norm curvature of one layer from its smaller Gram matrix (no full SVD).

Both decompositions of a layer — :class:`sdelip.core.spectral.SpectralDecomposition` (thin
SVD) and :class:`GramCurvature` (this module) — offer one interface used by the tracker
and the batched SDE path alike: ``sigma1``, ``u1``, ``v1``, ``gap``, ``degenerate``,
``terms(Gv, Gtu, lr, ...)`` (Thm 14 from the per-sample projections) and
``hessian_quadform(a, b)`` (gᵀHg of one gradient, Lemma 13). :func:`decompose_layer`
picks the route. :func:`decompose_batched` decomposes one layer's weight matrices over a
batch of SDE trajectories by either route and offers the same names, per trajectory
(:class:`BatchedDecomposition`).

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

:func:`fast_layer_terms` mirrors :func:`sdelip.core.formulas.terms_from_projections`; the tests
check that both give the same numbers.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch
from torch.func import vmap

from .formulas import LayerTerms, assemble_terms, diffusion_sq_from_projections, jacobian_var_dot, optimization_drift
from .spectral import DEFAULT_GAP_TOL, SpectralDecomposition, decompose

__all__ = ["GramCurvature", "gram_curvature", "fast_layer_terms", "top_eigenpairs", "decompose_layer",
           "DECOMPOSITIONS", "BatchedDecomposition", "decompose_batched"]

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

    def terms(self, Gv: torch.Tensor, Gtu: torch.Tensor, lr: float, *, noise_var=None, weight_decay: float = 0.0,
              extra_noise_var: float = 0.0, diffusion_split: bool = False) -> LayerTerms:
        """Thm 14 terms from the projections (:func:`fast_layer_terms`)."""
        return fast_layer_terms(self, Gv, Gtu, lr, noise_var=noise_var, weight_decay=weight_decay,
                                extra_noise_var=extra_noise_var, diffusion_split=diffusion_split)

    def hessian_quadform(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """gᵀ H g of one matrix g from a = g v1 and b = gᵀ u1 (original orientation, Lemma 13)."""
        A, B = (b, a) if self.transposed else (a, b)
        return self.hessian_quadform_sum(A[None], B[None])

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
) -> Optional[GramCurvature]:
    """Build :class:`GramCurvature` for the weight matrix W (m0 × n0).

    Returns None when the spectrum is degenerate (relative gap below ``gap_tol``) or the
    factorisation fails; the caller then uses the SVD route, which handles both (and
    warns or raises according to ``on_degenerate``).
    """
    W = W.detach()
    transposed = W.shape[0] > W.shape[1]
    th = W.mT if transposed else W
    G = th @ th.mT
    w, Z = top_eigenpairs(G, 2)
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


def fast_layer_terms(
    c: GramCurvature,
    Gv: torch.Tensor,
    Gtu: torch.Tensor,
    lr: float,
    noise_var: Optional[torch.Tensor] = None,
    weight_decay: float = 0.0,
    extra_noise_var: float = 0.0,
    diffusion_split: bool = False,
) -> LayerTerms:
    """Thm 14 terms from the projections, as :func:`sdelip.core.formulas.terms_from_projections`.

    Args:
        c: the layer's :class:`GramCurvature`.
        Gv: (M, m0) per-sample g_i v1; Gtu: (M, n0) per-sample g_iᵀ u1 (original orientation).
        lr: η.
        noise_var: diag Σ̂ (m0 × n0) for the Prop 6 split, or None.
        weight_decay: λ_wd (μ −= λ_wd).
        extra_noise_var: s² of an isotropic perturbation of the batch gradient (Sec 8.4).
        diffusion_split: with ``noise_var``, also compute ``diffusion_sq_var``.
    """
    M = Gv.shape[0]
    s1 = c.sigma1
    mean_v, mean_u = Gv.mean(0), Gtu.mean(0)
    Ev = Gv - mean_v
    Eu = Gtu - mean_u
    A, B = (Eu, Ev) if c.transposed else (Ev, Eu)
    cst = 1.0 / (M * (M - 1))
    proj = Ev @ c.u1
    diffusion_sq = diffusion_sq_from_projections(proj, s1, lr, M)
    noise_curvature = lr / (2 * s1) * cst * c.hessian_quadform_sum(A, B)
    mA, mB = (mean_u, mean_v) if c.transposed else (mean_v, mean_u)
    step_curvature = lr / (2 * s1) * c.hessian_quadform_sum(mA[None], mB[None]) - noise_curvature
    drift = optimization_drift(mean_v @ c.u1, s1, weight_decay)
    trace = []  # hessian_diag_dot returns tr H too: reuse it for the extra noise

    def diag_dot():
        dot, tr = c.hessian_diag_dot(noise_var)
        trace.append(tr)
        return dot

    return assemble_terms(
        s1, lr, drift, diffusion_sq, noise_curvature, step_curvature, c.gap, False,
        noise_var_dot=None if noise_var is None else diag_dot,
        hessian_trace=lambda: trace[0] if trace else c.hessian_trace(), extra_noise_var=extra_noise_var,
        jacobian_var_dot=jacobian_var_dot(c.u1, c.v1, noise_var) if diffusion_split else None,
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

    The interface of the per-layer decompositions (module docstring), one value per
    trajectory: the SDE systems' route to Thm 14's terms (:mod:`sdelip.sde`).

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

    def terms(self, Gv: torch.Tensor, Gtu: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Thm 14's κ and ‖λ‖² per trajectory, each (n,), from the per-sample projections.

        Gv (n, M, m) and Gtu (n, M, k) are g_i v1 and g_iᵀ u1 of each trajectory's noise
        mini-batch; the terms are those of :func:`sdelip.core.formulas.terms_from_projections`
        (SVD route) or of :func:`fast_layer_terms` (Gram route), which agree.
        """
        if self.svd is not None:
            def one(U, S, V, Gv, Gtu):
                t = SpectralDecomposition(U=U, S=S, V=V, gap_tol=self.gap_tol).terms(Gv, Gtu, lr)
                return t.noise_curvature, t.diffusion_sq

            return vmap(one)(*self.svd, Gv, Gtu)
        out = []
        for c, gv, gtu in zip(self.curvature, Gv, Gtu):
            t = c.terms(gv, gtu, lr)
            out.append(torch.stack([t.noise_curvature, t.diffusion_sq]))
        kappa, lam2 = torch.stack(out).unbind(1)
        return kappa, lam2

    def hessian_quadform(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """gᵀ H g per trajectory (n,) from a = g v1 (n, m) and b = gᵀ u1 (n, k) (Lemma 13)."""
        if self.svd is not None:
            def one(U, S, V, a, b):
                return SpectralDecomposition(U=U, S=S, V=V, gap_tol=self.gap_tol).hessian_quadform(a, b)

            return vmap(one)(*self.svd, a, b)
        return torch.stack([c.hessian_quadform(x, y) for c, x, y in zip(self.curvature, a, b)])


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
