"""The amortised geometry route: the previous tracked step's eigenbasis, refined, with an a posteriori bound.

Between two tracked steps a layer's weights move by one optimizer step (‖Δθ‖/‖θ‖ ~ 1e-3),
so the top eigenvectors of the oriented Gram matrix G = θθᵀ at the previous step are an
almost exact starting point for this step's. The exact ``"fast"`` route
(:func:`sdelip.core.decompositions.gram_curvature`) spends most of its eigen-time in
LAPACK's tridiagonal reduction of G (memory-bound, O(m³)); this route replaces only that
part:

1. a block Krylov (block Lanczos, full reorthogonalisation, float64) space on G started
   from the previous step's top p = 4 eigenvectors, grown by the residuals of its Ritz
   vectors (one product G·(m × p) per block) until the a posteriori bound below is
   ≤ ``tol · margin`` or the space reaches ``max_dim`` columns;
2. the resolvent R, its Cholesky factor and inverse, and every term, exactly as in the
   ``"fast"`` route, from the Ritz pair (θ1, y1) and θ2 (the same code path,
   :func:`~sdelip.core.decompositions.gram_curvature` with ``eigenpairs=``).

**A posteriori bound** (docs/theory.md §5; Davis–Kahan/Kato–Temple residual bounds). With
Ritz values θ1 ≥ θ2 ≥ θ3 and residual norms r_k = ‖G y_k − θ_k y_k‖, the separation of
λ1 from the rest of the spectrum is estimated as δ1 = θ1 − θ2 − r2, and

    sin∠(u1, y1) ≤ r1/δ1,      |λ1 − θ1| ≤ r1²/δ1,
    ‖ΔR‖/‖R‖ ≲ 2(θ1 r1/δ1 + r1²/δ1)/δ1   (R = (λ1I − G + λ1u1u1ᵀ)⁻¹ − u1u1ᵀ/λ1, ‖R‖ = 1/(λ1 − λ2)),
    |λ2 − θ2| ≤ min(r2, r2²/δ2),  δ2 = min(θ1 − r1 − θ2, θ2 − θ3 − r3) − r2,

the last giving the relative error of the gap (σ1 − σ2)/σ1. The recorded bound is the
largest of these relative errors (σ1, u1/v1, R, gap). The terms are smooth functions of
(σ1, u1, R) and are computed from them by the same code as the exact route, so to first order
their relative errors are of the order of this bound (a term that is itself a small
difference, such as μ near a stationary point, is relative to its constituents' size). The
bounds hold for the eigenvalues the Ritz values approximate; the Krylov space is started on the previous
eigenvectors, so a missed eigenvalue would need the spectrum to reorder between two steps,
which the check δ1 > 0 and the fall-back on a failed bound guard against.

**Fall-back.** When the bound exceeds ``tol`` (default 1e-8) after ``max_dim`` columns,
when the layer has no previous state (its first tracked step, a shape change, a resumed
run) or when the spectrum is degenerate, the layer is decomposed by the exact route and
the step counted as a fall-back (:class:`AmortisedGeometry` counters). No periodic
refresh is needed: the refinement does not accumulate error, each step's bound is computed
from this step's G alone.

Computed in float64 from the Gram matrix of the layer's dtype: for a float32 layer the
refined eigenpair is at least as accurate as LAPACK's float32 one; the comparison at
1e-8 is meaningful in float64 (the tests).
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

from .decompositions import GramCurvature, decompose_layer, gram_curvature, top_eigenpairs
from .spectral import decompose

__all__ = ["AmortisedCurvature", "AmortisedGeometry", "warm_top_eigenpairs", "eigen_bound", "AUTO_MIN_DIM",
           "DEFAULT_TOL"]

#: Default tolerance of the a posteriori bound (relative error of every recorded term).
DEFAULT_TOL = 1e-8
#: ``decomposition="auto"``: layers whose smaller dimension is at least this use the amortised
#: route, smaller ones the exact ``"fast"`` route (LAPACK on a small Gram matrix costs less than the
#: Python overhead of the Krylov blocks; docs/performance.md).
AUTO_MIN_DIM = 256
#: Below this smaller dimension every route (``"amortised"`` included) uses the exact ``"fast"``
#: route: the Krylov space would span most of the space.
MIN_DIM = 32


@attrs.frozen
class AmortisedCurvature(GramCurvature):
    """A :class:`~sdelip.core.decompositions.GramCurvature` with the a posteriori bound of its eigenpairs.

    Attributes:
        error_bound: the bound of the module docstring (0.0 when the exact eigensolver ran).
        amortised: True when the eigenpairs came from the warm-started Krylov refinement,
            False when this step fell back to (or started with) the exact route.
        krylov_dim: columns of the Krylov space used (0 for the exact route).
    """

    error_bound: float = 0.0
    amortised: bool = False
    krylov_dim: int = 0


def eigen_bound(theta: torch.Tensor, res: torch.Tensor) -> float:
    """The a posteriori relative-error bound (module docstring) from Ritz values θ (desc.) and residual norms."""
    t1, t2 = float(theta[0]), float(theta[1])
    r1, r2 = float(res[0]), float(res[1])
    t3 = float(theta[2]) if theta.shape[0] > 2 else 0.0
    r3 = float(res[2]) if res.shape[0] > 2 else 0.0
    if not (t1 > 0 and math.isfinite(t1)):
        return math.inf
    d1 = t1 - t2 - r2
    if d1 <= 0:
        return math.inf
    e_u = r1 / d1
    dl1 = r1 * r1 / d1
    e_R = 2.0 * (t1 * e_u + dl1) / d1
    d2 = min(t1 - r1 - t2, t2 - t3 - r3) - r2
    dl2 = min(r2, r2 * r2 / d2) if d2 > 0 else r2
    t2p = max(t2, 0.0)
    gap = 1.0 - math.sqrt(t2p / t1)
    if gap <= 0:
        return math.inf
    e_gap = dl2 / (2.0 * math.sqrt(t1 * max(t2p, dl2)) * gap) if t2p > 0 else dl2 / t1
    return max(e_u, dl1 / t1, e_R, e_gap)


def warm_top_eigenpairs(G: torch.Tensor, X0: torch.Tensor, target: float, max_dim: int,
                        precond: Optional[torch.Tensor] = None):
    """The top eigenpairs of the symmetric G (float64) from a block subspace started on X0 (m × p).

    Each step adds the residuals of the p Ritz vectors (block Lanczos) or, with ``precond``
    (the previous step's resolvent R, m × m), the preconditioned residuals R·res (block
    Davidson: R ≈ (λ1 I − G)⁺ makes the correction of y1 a near-Newton (Jacobi–Davidson) step
    and weights the next eigenvectors by 1/(λ1 − λk), which separates a clustered λ2, λ3).
    Returns (w (p,) descending Ritz values, Y (m, p) Ritz vectors, bound, dimension).
    """
    m, p = X0.shape
    V, _ = torch.linalg.qr(X0)
    GV = G @ V
    while True:
        T = V.mT @ GV
        T = 0.5 * (T + T.mT)
        w, S = torch.linalg.eigh(T)
        w, S = w.flip(0)[:p], S.flip(1)[:, :p]
        Y = V @ S
        Res = GV @ S - Y * w
        res = Res.norm(dim=0)
        bound = eigen_bound(w, res)
        k = V.shape[1]
        if bound <= target or k + p > max_dim:
            return w, Y, bound, k
        if precond is not None:
            Res = precond @ Res
        Q = Res - V @ (V.mT @ Res)
        Q = Q - V @ (V.mT @ Q)  # twice is enough (Kahan)
        Q, Rq = torch.linalg.qr(Q)
        keep = Rq.diagonal().abs() > 1e-12 * max(float(res.max()), 1e-300)
        if not bool(keep.any()):
            return w, Y, bound, k
        Q = Q[:, keep]
        V = torch.cat([V, Q], 1)
        GV = torch.cat([GV, G @ Q], 1)


class AmortisedGeometry:
    """Per-run state of the amortised route: each layer's previous eigenbasis, the bounds and the counters.

    One instance per :class:`~sdelip.tracking.tracker.Tracker` (created on its first tracked
    step); :meth:`decompose` is :func:`~sdelip.core.decompositions.decompose_layer` for the
    routes ``"amortised"`` and ``"auto"``.

    Args:
        tol: fall back to the exact route when the a posteriori bound exceeds this.
        margin: the Krylov refinement stops once the bound is ≤ ``tol · margin``.
        block: p, the number of previous eigenvectors kept and the block size.
        max_dim: the largest Krylov space (columns) before falling back.
        min_dim: ``"auto"`` uses the amortised route for layers with min(m, n) ≥ this.
        precondition: expand the subspace by the previous step's resolvent applied to the
            residuals (block Davidson, default) rather than by the residuals (block Lanczos).

    Attributes:
        steps: layer-steps decomposed by the amortised route or its fall-back.
        amortised: layer-steps whose eigenpairs came from the refinement.
        fallbacks: layer-steps that ran the exact route (first step of a layer included).
        bound_fallbacks: fall-backs because the bound exceeded ``tol`` (not first steps).
        fallback_steps: the tracked steps in which at least one layer fell back on its bound.
        worst_bound: the largest bound accepted so far.
        bounds: layer name → the bound of its latest decomposition.
        routes: layer name → the route of its latest decomposition: ``"amortised"``, ``"exact"``
            (the ``"fast"`` route as the amortised route's start or fall-back), ``"svd"`` (a
            degenerate spectrum) or ``"fast"`` (a layer below ``min_dim`` under ``"auto"``).
    """

    def __init__(self, tol: float = DEFAULT_TOL, margin: float = 1e-2, block: int = 4, max_dim: int = 64,
                 min_dim: int = AUTO_MIN_DIM, precondition: bool = True):
        self.tol, self.margin, self.block, self.max_dim, self.min_dim = float(tol), float(margin), int(block), \
            int(max_dim), int(min_dim)
        self.precondition = bool(precondition)
        self._prev: dict = {}
        self.steps = self.amortised = self.fallbacks = self.bound_fallbacks = 0
        self.fallback_steps: set = set()
        self.worst_bound = 0.0
        self.bounds: dict = {}
        self.routes: dict = {}

    def summary(self) -> dict:
        """The counters, for the tracker's metadata."""
        return {"amortised_layer_steps": self.amortised, "exact_layer_steps": self.fallbacks,
                "bound_fallbacks": self.bound_fallbacks, "bound_fallback_steps": len(self.fallback_steps),
                "worst_error_bound": self.worst_bound,
                "error_tol": self.tol,
                "layers": {k: {"route": self.routes[k], "error_bound": self.bounds.get(k, 0.0)} for k in self.routes}}

    def route(self, W: torch.Tensor, method: str) -> str:
        """The route a layer takes: ``"amortised"``, or ``"fast"`` for a small layer under ``"auto"``."""
        if method == "auto" and min(W.shape[-2:]) < self.min_dim:
            return "fast"
        return "amortised"

    def decompose(self, W: torch.Tensor, method: str, gap_tol: float, on_degenerate: str = "warn",
                  name: Optional[str] = None, step: Optional[int] = None):
        """The decomposition of W by the amortised route (or its fall-back), updating the state of ``name``."""
        if self.route(W, method) == "fast" or min(W.shape[-2:]) < max(MIN_DIM, 4 * self.block):
            self.routes[name] = "fast"
            return decompose_layer(W, "fast", gap_tol, on_degenerate, name=name, step=step)
        W = W.detach()
        key = (name, tuple(W.shape), W.dtype, W.device)
        prev = self._prev.get(name)
        info = {}
        p = self.block

        def exact(G):
            w, Z = top_eigenpairs(G, p)
            info.update(Z=Z.to(torch.float64), bound=0.0, amortised=False, dim=0)
            return w, Z

        def refined(G):
            G64 = G.to(torch.float64, copy=True)
            w, Y, bound, k = warm_top_eigenpairs(G64, prev[1], self.tol * self.margin, self.max_dim, precond=prev[2])
            if not bound <= self.tol:
                info["failed"] = bound
                return exact(G)
            info.update(Z=Y, bound=bound, amortised=True, dim=k)
            return w, Y

        warm = prev is not None and prev[0] == key
        d = gram_curvature(W, gap_tol, eigenpairs=refined if warm else exact)
        self.steps += 1
        if d is None:  # degenerate spectrum or failed factorisation: the SVD route, as "fast" does
            self._prev.pop(name, None)
            self.fallbacks += 1
            self.bounds[name] = 0.0
            self.routes[name] = "svd"
            return decompose(W, method="svd", gap_tol=gap_tol, on_degenerate=on_degenerate, name=name, step=step)
        # R is symmetric and column-major (cholesky_inverse): its contiguous transpose is the fast operand
        self._prev[name] = (key, info["Z"], d.R.mT.to(torch.float64).contiguous() if self.precondition else None)
        if info["amortised"]:
            self.amortised += 1
            self.worst_bound = max(self.worst_bound, info["bound"])
        else:
            self.fallbacks += 1
            if "failed" in info:
                self.bound_fallbacks += 1
                self.fallback_steps.add(step)
        self.bounds[name] = info["bound"]
        self.routes[name] = "amortised" if info["amortised"] else "exact"
        return AmortisedCurvature(**attrs.asdict(d, recurse=False), error_bound=info["bound"],
                                  amortised=info["amortised"], krylov_dim=info["dim"])
