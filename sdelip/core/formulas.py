"""The terms of the Lipschitz dynamics (Thm 14, 15, 16, 17).

Per layer (Thm 14, docs/theory.md §6), with ∇L the expected gradient and Σ̂ the Prop 5
estimate of the mini-batch gradient covariance:

- drift            μ  = −u1ᵀ ∇L v1 / σ1
- diffusion_sq   ‖λ‖² = (η/σ1²) Jᵀ Σ̂ J
- noise_curvature  κ  = (η/2σ1) tr(H Σ̂) ≥ 0, split (Prop 6) into
  ``noise_curvature_var`` (diagonal of Σ̂) and ``noise_curvature_cov`` (the rest).

Per network (Thm 15): μ_Z = Σμ, κ_Z = Σκ, λ_Z² = Σ‖λ‖², Z = Σ log σ1, K = e^Z, and
dZ = (μ_Z + κ_Z − ½λ_Z²) dt + λ_Z dW. Thm 17 gives E[Z], Var[Z], E[K], Var[K]. A weight
applied c > 1 times (tied weights) contributes the factor σ1^c to K, whose terms are
those of :func:`repeated_use_terms`.

All per-layer terms are computed from the two projections g_i v1 and g_iᵀ u1 of each
per-sample gradient (docs/theory.md §8): no mn × mn matrix is ever formed, and the
per-sample gradients themselves are optional (:func:`terms_from_projections`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import attrs
import numpy as np
import torch

from .._checks import check_batch_size, check_finite, check_per_sample, check_positive
from .catalogue import TERMS, repeated_use_rules, term
from .decompositions import BatchedDecomposition, Decomposition
from .spectral import DEFAULT_GAP_TOL, decompose

__all__ = [
    "LayerTerms",
    "NetworkTerms",
    "LipschitzMoments",
    "terms_from_projections",
    "optimization_drift",
    "diffusion_sq_from_projections",
    "layer_terms",
    "network_terms",
    "repeated_use_terms",
    "repeated_use_coefficients",
    "lipschitz_moments",
]


def _tensor_field(**kwargs):
    return attrs.field(converter=lambda x: x if x is None or isinstance(x, torch.Tensor) else torch.as_tensor(x),
                       **kwargs)


@attrs.frozen
class LayerTerms:
    """The Thm 14 terms of one layer at one step (0-d tensors).

    Attributes:
        sigma1: K^(ℓ) = σ1(θ), the layer's operator norm (Prop 9).
        drift: μ, the optimization-induced drift (Thm 14).
        diffusion_sq: ‖λ‖², the squared diffusion-modulation intensity (Thm 14).
        noise_curvature: κ, the noise-curvature entropy production (Thm 14), ≥ 0.
        noise_curvature_var: the part of κ due to the variances (diagonal) of Σ (Prop 6).
        noise_curvature_cov: κ − κ_var, the part due to the covariances (Prop 6).
        gap: relative spectral gap (σ1 − σ2)/σ1 (Assumption 11).
        degenerate: True when the gap was below tolerance and the Hessian was clamped.
        step_curvature: (η/2σ1) ∇Lᵀ H ∇L, estimated without bias from the mini-batch as
            (η/2σ1)(ḡᵀHḡ − tr(HΣ̂)): the O(η) drift of ΔK/K per unit time that a discrete
            SGD step adds and the SDE drops (docs/theory.md §6; the paper's Sec 9 limitation 3).
            Not part of Thm 14; None when not computed.
        diffusion_sq_var: the part of ‖λ‖² due to the variances (diagonal) of Σ̂,
            (η/σ1²) Σ_j J_j² (diag Σ̂)_j: the Prop 6 split applied to ‖λ‖², needed for the
            split of a weight applied more than once (:func:`repeated_use_terms`); None
            when not computed.
    """

    sigma1: torch.Tensor = _tensor_field()
    drift: torch.Tensor = _tensor_field()
    diffusion_sq: torch.Tensor = _tensor_field()
    noise_curvature: torch.Tensor = _tensor_field()
    noise_curvature_var: Optional[torch.Tensor] = _tensor_field()
    noise_curvature_cov: Optional[torch.Tensor] = _tensor_field()
    gap: torch.Tensor = _tensor_field()
    degenerate: bool = False
    step_curvature: Optional[torch.Tensor] = _tensor_field(default=None)
    diffusion_sq_var: Optional[torch.Tensor] = _tensor_field(default=None)

    def as_dict(self) -> dict:
        """The terms as Python floats (None where the split was not computed).

        ``diffusion_sq_var`` appears only when it was computed.
        """
        out = {}
        for f in attrs.fields(type(self)):
            v = getattr(self, f.name)
            if v is None and f.name == "diffusion_sq_var":
                continue
            out[f.name] = v if isinstance(v, bool) or v is None else float(v)
        return out


@attrs.frozen
class NetworkTerms:
    """The Thm 15 network terms: sums over layers (Assumption 3: layers independent).

    Attributes:
        Z: log K = Σ log σ1 (Def 10).
        K: the product bound Π σ1 (Prop 8, activations 1-Lipschitz).
        drift_Z: μ_Z = Σ μ.
        noise_curvature_Z: κ_Z = Σ κ.
        diffusion_sq_Z: λ_Z² = Σ ‖λ‖².
        noise_curvature_var_Z: Σ κ_var (None if any layer lacks the split).
        noise_curvature_cov_Z: Σ κ_cov.
        step_curvature_Z: Σ of the layers' step curvature (None if any layer lacks it).
    """

    Z: float
    K: float
    drift_Z: float
    noise_curvature_Z: float
    diffusion_sq_Z: float
    noise_curvature_var_Z: Optional[float] = None
    noise_curvature_cov_Z: Optional[float] = None
    step_curvature_Z: Optional[float] = None

    @property
    def log_drift(self) -> float:
        """The drift of dZ: μ_Z + κ_Z − ½ λ_Z² (Thm 15, Eq. 13)."""
        return self.drift_Z + self.noise_curvature_Z - 0.5 * self.diffusion_sq_Z


def optimization_drift(grad_proj, sigma1, weight_decay: float = 0.0):
    """Thm 14's optimization drift μ = −u1ᵀ∇L v1/σ1 of log σ1, minus λ_wd with an L2 penalty.

    Args:
        grad_proj: u1ᵀ ∇L v1 (a scalar or one per trajectory).
        sigma1: σ1, same shape.
        weight_decay: λ_wd (the penalty's gradient λ_wd W contributes −λ_wd exactly).
    """
    return -grad_proj / sigma1 - weight_decay


def diffusion_sq_from_projections(proj: torch.Tensor, sigma1, lr: float, M: int):
    """Thm 14's ‖λ‖² = (η/σ1²) Σ_i (u1ᵀ E_i v1)²/(M(M−1)) from the centred projections proj = u1ᵀ E_i v1 (M,)."""
    return lr / sigma1**2 * (1.0 / (M * (M - 1))) * (proj * proj).sum()


def terms_from_projections(
    d: Decomposition,
    Gv: torch.Tensor,
    Gtu: torch.Tensor,
    lr: float,
    grad_proj: Optional[torch.Tensor] = None,
    noise_var: Optional[torch.Tensor] = None,
    weight_decay: float = 0.0,
    extra_noise_var: float = 0.0,
    diffusion_split: bool = False,
) -> LayerTerms:
    """Thm 14 terms of one layer from the projections of its per-sample gradients.

    The one formula of the terms, on every route: ``d`` is any
    :class:`~sdelip.core.decompositions.Decomposition` (thin SVD, Gram matrix, or a
    :class:`~sdelip.core.decompositions.BatchedDecomposition` over SDE trajectories), and only
    its primitives are used. This is the factored core (docs/theory.md §8): with E_i = g_i − ḡ,

        ‖λ‖² = (η/σ1²) (1/(M(M−1))) Σ_i (u1ᵀ E_i v1)²
        κ    = (η/2σ1) (1/(M(M−1))) Σ_i vec(E_i)ᵀ H vec(E_i)
        κ_var = (η/2σ1) Σ_j D_j (diag Σ̂)_j,   κ_cov = κ − κ_var
        μ    = −u1ᵀ ∇L v1 / σ1 − λ_wd

    Weight decay (loss + (λ_wd/2)‖θ‖²) adds λ_wd θ to every per-sample gradient: the
    noise is unchanged and μ decreases by exactly λ_wd (u1ᵀθv1 = σ1); θ lies in the
    null space of H (σ1 is 1-homogeneous), so the step curvature is unchanged too.

    Beyond Thm 14, ``step_curvature`` = (η/2σ1)(ḡᵀHḡ − tr(HΣ̂)) estimates without bias the
    drift (η/2σ1)∇LᵀH∇L of a discrete step, E[ΔK/K] = (μ + κ + step_curvature)η + O(η³)
    for a symmetric noise distribution, which the SDE drops (docs/theory.md §6). An isotropic
    gradient perturbation with covariance s²I added to the mini-batch gradient (Sec 8.4)
    adds η s²/σ1² to ‖λ‖² and (η/2σ1) s² tr H to κ (all of it to κ_var).

    Args:
        d: the decomposition of θ (:class:`~sdelip.core.decompositions.Decomposition`).
        Gv: (M, m) per-sample g_i v1.
        Gtu: (M, n) per-sample g_iᵀ u1.
        lr: learning rate η (SDE time step).
        grad_proj: u1ᵀ ∇L v1 for the expected gradient ∇L; defaults to the mini-batch
            mean, mean_i (u1 · g_i v1).
        noise_var: diag Σ̂ as an (m, n) matrix, for the Prop 6 split; None skips it.
        weight_decay: λ_wd of an L2 penalty applied by the optimizer.
        extra_noise_var: s² of an isotropic perturbation added to the batch gradient.
        diffusion_split: with ``noise_var``, also compute ``diffusion_sq_var``
            = (η/σ1²) Σ_j (u1 v1ᵀ)_j² (diag Σ̂)_j.

        With a :class:`~sdelip.core.decompositions.BatchedDecomposition` of n trajectories,
        ``Gv``, ``Gtu``, ``grad_proj`` and ``noise_var`` carry a leading axis n, and so does
        every field of the result (``degenerate`` is an (n,) bool tensor): the formula is
        applied to each trajectory (:meth:`~sdelip.core.decompositions.BatchedDecomposition.per_trajectory`).

    Returns:
        :class:`LayerTerms`.
    """
    if isinstance(d, BatchedDecomposition):
        def one(dj, Gv, Gtu, grad_proj, noise_var):
            t = terms_from_projections(dj, Gv, Gtu, lr, grad_proj=grad_proj, noise_var=noise_var,
                                       weight_decay=weight_decay, extra_noise_var=extra_noise_var,
                                       diffusion_split=diffusion_split)
            return {k: v for k, v in _tensor_terms(t).items() if v is not None}

        fields = d.per_trajectory(one, Gv, Gtu, grad_proj, noise_var)
        return LayerTerms(**{k: fields.get(k) for k in _tensor_terms(None)}, degenerate=d.degenerate)
    M = Gv.shape[0]
    check_batch_size(M)
    s1, u1 = d.sigma1, d.u1
    mean_v, mean_u = Gv.mean(0), Gtu.mean(0)
    Ev = Gv - mean_v
    Eu = Gtu - mean_u
    c = 1.0 / (M * (M - 1))
    proj = Ev @ u1  # u1ᵀ E_i v1
    diffusion_sq = diffusion_sq_from_projections(proj, s1, lr, M)
    noise_curvature = lr / (2 * s1) * c * d.hessian_quadform_sum(Ev, Eu)
    step_curvature = lr / (2 * s1) * d.hessian_quadform(mean_v, mean_u) - noise_curvature
    if grad_proj is None:
        grad_proj = mean_v @ u1
    drift = optimization_drift(grad_proj, s1, weight_decay)
    trace = []  # hessian_diag_dot returns tr H too: reuse it for the extra noise

    def diag_dot():
        dot, tr = d.hessian_diag_dot(noise_var)
        trace.append(tr)
        return dot

    return _assemble_terms(
        s1, lr, drift, diffusion_sq, noise_curvature, step_curvature, d.gap, d.degenerate,
        noise_var_dot=None if noise_var is None else diag_dot,
        hessian_trace=lambda: trace[0] if trace else d.hessian_trace(), extra_noise_var=extra_noise_var,
        jacobian_var_dot=_jacobian_var_dot(u1, d.v1, noise_var) if diffusion_split else None,
    )


def _tensor_terms(t: Optional[LayerTerms]) -> dict:
    """The tensor fields of ``t`` (every field but ``degenerate``), by name; with t = None, the names → None."""
    return {f.name: None if t is None else getattr(t, f.name) for f in attrs.fields(LayerTerms) if f.name != "degenerate"}


def _jacobian_var_dot(u1: torch.Tensor, v1: torch.Tensor, noise_var: Optional[torch.Tensor]):
    """A callable → Σ_j J_j² (diag Σ̂)_j = (u1∘u1)ᵀ diag Σ̂ (v1∘v1), or None without ``noise_var``."""
    if noise_var is None:
        return None
    return lambda: (u1 * u1) @ noise_var @ (v1 * v1)


def _assemble_terms(
    s1, lr, drift, diffusion_sq, noise_curvature, step_curvature, gap, degenerate,
    noise_var_dot=None, hessian_trace=None, extra_noise_var: float = 0.0, jacobian_var_dot=None,
) -> LayerTerms:
    """The tail of :func:`terms_from_projections`: the Prop 6 split and Sec 8.4 noise.

    Args:
        s1, lr, drift, diffusion_sq, noise_curvature, step_curvature, gap, degenerate: the
            terms computed from the mini-batch (κ and ‖λ‖² without the extra noise).
        noise_var_dot: callable → ⟨diag H, diag Σ̂⟩, or None to skip the split.
        hessian_trace: callable → tr H, needed when ``extra_noise_var`` is non-zero.
        extra_noise_var: s² of an isotropic perturbation s²I of the batch gradient; it adds
            η s²/σ1² to ‖λ‖² and (η/2σ1) s² tr H to κ (all of it to κ_var).
        jacobian_var_dot: callable → Σ_j J_j² (diag Σ̂)_j for ``diffusion_sq_var``, or None.
    """
    nc_var = None if noise_var_dot is None else lr / (2 * s1) * noise_var_dot()
    d_var = None if jacobian_var_dot is None else lr / s1**2 * jacobian_var_dot()
    if extra_noise_var:
        diffusion_sq = diffusion_sq + lr * extra_noise_var / s1**2
        extra = lr / (2 * s1) * extra_noise_var * hessian_trace()
        noise_curvature = noise_curvature + extra
        if nc_var is not None:
            nc_var = nc_var + extra
        if d_var is not None:  # ‖J‖ = 1: all of the isotropic noise is on the diagonal
            d_var = d_var + lr * extra_noise_var / s1**2
    return LayerTerms(
        sigma1=s1,
        drift=drift,
        diffusion_sq=diffusion_sq,
        noise_curvature=noise_curvature,
        noise_curvature_var=nc_var,
        noise_curvature_cov=None if nc_var is None else noise_curvature - nc_var,
        gap=gap,
        degenerate=degenerate,
        step_curvature=step_curvature,
        diffusion_sq_var=d_var,
    )


def layer_terms(
    W: torch.Tensor,
    G: torch.Tensor,
    lr: float,
    grad: Optional[torch.Tensor] = None,
    weight_decay: float = 0.0,
    extra_noise_var: float = 0.0,
    split: bool = True,
    gap_tol: float = DEFAULT_GAP_TOL,
    on_degenerate: str = "warn",
    name: Optional[str] = None,
) -> LayerTerms:
    """Thm 14 terms of one layer from its weight matrix and per-sample gradients.

    Never forms an mn × mn matrix: the per-sample gradients are reduced to their
    projections g_i v1, g_iᵀ u1 and their elementwise second moment.

    Args:
        W: (m, n) weight matrix θ.
        G: (M, m, n) per-sample gradients g_i = ∇_θ ℓ(θ; x_i, y_i), M ≥ 2.
        lr: learning rate η.
        grad: (m, n) expected gradient ∇L for μ; defaults to the mean of G.
        weight_decay: L2 coefficient applied by the optimizer (μ −= λ_wd exactly).
        extra_noise_var: isotropic variance added to the batch gradient (Sec 8.4).
        split: compute the Prop 6 variance/covariance split of κ.
        gap_tol: relative-gap tolerance (Assumption 11).
        on_degenerate: "warn", "raise" or "ignore" for a degenerate σ1.
        name: layer name for messages.
    """
    lr = check_positive(lr, "lr")
    check_per_sample(G, name)
    if tuple(G.shape[1:]) != tuple(W.shape):
        raise ValueError(
            f"per-sample gradients{' of ' + repr(name) if name else ''} have shape {tuple(G.shape[1:])}, "
            f"the weight matrix {tuple(W.shape)}"
        )
    d = decompose(W, gap_tol=gap_tol, on_degenerate=on_degenerate, name=name)
    Gv = G @ d.v1
    Gtu = G.mT @ d.u1
    grad_proj = None
    if grad is not None:
        check_finite(grad, "expected gradient", name)
        grad_proj = d.u1 @ grad @ d.v1
    noise_var = None
    if split:
        M = G.shape[0]
        mean = G.mean(0)
        noise_var = ((G * G).sum(0) - M * mean * mean).clamp_min(0) / (M * (M - 1))
    return terms_from_projections(
        d, Gv, Gtu, lr, grad_proj=grad_proj, noise_var=noise_var,
        weight_decay=weight_decay, extra_noise_var=extra_noise_var,
    )


def _uses(uses) -> int:
    c = int(uses)
    if c < 1:
        raise ValueError(f"a weight is applied at least once, got uses = {uses!r}")
    return c


def repeated_use_coefficients(uses: int, drift, noise_curvature, diffusion_sq):
    """(μ, κ, ‖λ‖²) of σ1(θ)^c from those of σ1(θ): (cμ, cκ + ½c(c−1)‖λ‖², c²‖λ‖²).

    Itô's lemma for f = σ1^c, with dσ1/σ1 = (μ + κ) dt + λᵀ dB (Thm 14), gives

        df/f = c (μ + κ) dt + ½ c(c−1) ‖λ‖² dt + c λᵀ dB,

    one Brownian motion B driving all c uses: the ``repeated_use`` rules of these three terms'
    entries in :data:`sdelip.core.catalogue.TERMS`. Works on floats, arrays and tensors alike.
    """
    c = _uses(uses)
    if c == 1:
        return drift, noise_curvature, diffusion_sq
    t = _Coefficients(drift, noise_curvature, diffusion_sq)
    return tuple(term(k).repeated_use(t, c, None, 0.0) for k in ("drift", "noise_curvature", "diffusion_sq"))


@attrs.frozen
class _Coefficients:
    drift: object
    noise_curvature: object
    diffusion_sq: object


def repeated_use_terms(t: LayerTerms, uses: int, lr: float, extra_noise_var: float = 0.0) -> LayerTerms:
    """Thm 14's terms of the factor σ1(θ)^c that a weight applied c times contributes to K (Prop 8).

    A tied weight is one θ with one σ1 and one set of Thm 14 terms ``t`` (from its
    per-sample gradient, the total derivative over all uses); the product bound multiplies
    σ1(θ) once per use. Thm 14 applied to f(θ) = σ1(θ)^c, with ∇f = c σ1^{c−1} J and
    ∇²f = c σ1^{c−1} H + c(c−1) σ1^{c−2} J Jᵀ, gives

        μ_f = c μ,    κ_f = c κ + ½c(c−1) ‖λ‖²,    ‖λ_f‖² = c² ‖λ‖²,

    (:func:`repeated_use_coefficients`), so that μ_f + κ_f − ½‖λ_f‖² = c (μ + κ − ½‖λ‖²) is
    the drift of c log σ1. The Prop 6 split puts the diagonal of J Jᵀ, J∘J, with the
    variances: κ_f,var = c κ_var + ½c(c−1) ``diffusion_sq_var``. The step curvature
    (η/2f) ∇Lᵀ∇²f ∇L = c (η/2σ1) ∇LᵀH∇L + ½c(c−1) η μ², with η μ² estimated without bias by
    η μ̂² − ‖λ‖²_sampling (Var μ̂ = ‖λ‖²_sampling / η, ‖λ‖² without the extra noise).

    Every field of :class:`LayerTerms` is derived by its rule: the ``repeated_use`` of its
    :data:`sdelip.core.catalogue.TERMS` entry, or :data:`~sdelip.core.catalogue.AUXILIARY_REPEATED_USE`
    for the fields that are not record columns. A field without a rule is an error, never None.

    Args:
        t: the Thm 14 terms of θ (with ``diffusion_sq_var`` when the split is wanted).
        uses: c ≥ 1; c = 1 returns ``t`` itself.
        lr: η.
        extra_noise_var: s² of the isotropic noise included in ``t.diffusion_sq``.

    Returns:
        :class:`LayerTerms` of the factor, ``sigma1`` = σ1(θ)^c.

    Raises:
        ValueError: c < 1; the Prop 6 split without ``diffusion_sq_var``; a LayerTerms field
            without a repeated-use rule.
    """
    c = _uses(uses)
    if c == 1:
        return t
    rules = repeated_use_rules()
    fields = [f.name for f in attrs.fields(LayerTerms)]
    missing = [name for name in fields if rules.get(name) is None]
    if missing:
        raise ValueError(
            f"the term(s) {', '.join(missing)} of a weight applied {c} times have no repeated-use rule: "
            "give each its rule (Term.repeated_use in sdelip.core.catalogue)"
        )
    return LayerTerms(**{name: rules[name](t, c, lr, extra_noise_var) for name in fields})


def network_terms(layers: Sequence[LayerTerms]) -> NetworkTerms:
    """Aggregate per-layer terms into the network terms of Thm 15 (Assumption 3).

    Each entry is the terms of one factor of K: a layer's own terms, or for a weight
    applied c > 1 times those of σ1^c (:func:`repeated_use_terms`).
    """
    if len(layers) == 0:
        raise ValueError("network_terms needs at least one layer")
    Z = sum(math.log(float(t.sigma1)) for t in layers)
    has_split = all(t.noise_curvature_var is not None for t in layers)
    return NetworkTerms(
        Z=Z,
        K=math.exp(Z),
        drift_Z=sum(float(t.drift) for t in layers),
        noise_curvature_Z=sum(float(t.noise_curvature) for t in layers),
        diffusion_sq_Z=sum(float(t.diffusion_sq) for t in layers),
        noise_curvature_var_Z=sum(float(t.noise_curvature_var) for t in layers) if has_split else None,
        noise_curvature_cov_Z=sum(float(t.noise_curvature_cov) for t in layers) if has_split else None,
        step_curvature_Z=(sum(float(t.step_curvature) for t in layers)
                          if all(t.step_curvature is not None for t in layers) else None),
    )


@attrs.frozen
class LipschitzMoments:
    """Thm 17 moments on the step grid t_k = k·dt, k = 0..T (arrays of length T + 1).

    Attributes:
        t: times.
        mean_Z, var_Z: E[Z(t)] (Eq. 17) and Var[Z(t)] (Eq. 18).
        mean_K, var_K: E[K(t)] (Eq. 15) and Var[K(t)] (Eq. 16).
        path_Z: the deterministic part of Thm 16, Z0 + ∫(μ_Z + κ_Z − ½λ_Z²) (= mean_Z).
    """

    t: np.ndarray
    mean_Z: np.ndarray
    var_Z: np.ndarray
    mean_K: np.ndarray
    var_K: np.ndarray

    @property
    def std_K(self) -> np.ndarray:
        return np.sqrt(self.var_K)


def lipschitz_moments(K0, drift_Z, noise_curvature_Z, diffusion_sq_Z, dt) -> LipschitzMoments:
    """Thm 17: E[Z], Var[Z], E[K], Var[K] from per-step network coefficients.

    Coefficient k holds on [k·dt, (k+1)·dt) (one value per SGD step, dt = η), so every
    integral ∫_0^{t_k} f ds is the left sum Σ_{j<k} f_j·dt (docs/theory.md §1). Exact when the
    coefficients are deterministic functions of time.

        E[Z(t)] = Z0 + ∫(μ_Z + κ_Z − ½λ_Z²),   Var[Z(t)] = ∫λ_Z²,
        E[K(t)] = K0 exp ∫(μ_Z + κ_Z),          Var[K(t)] = E[K]² (e^{Var Z} − 1).

    Args:
        K0: K(0) > 0 (Z0 = log K0).
        drift_Z, noise_curvature_Z, diffusion_sq_Z: arrays of length T.
        dt: step length (the learning rate η).

    Returns:
        :class:`LipschitzMoments` with arrays of length T + 1.
    """
    dt = check_positive(dt, "dt")
    K0 = check_positive(K0, "K0")
    mu, kappa, lam2 = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (drift_Z, noise_curvature_Z, diffusion_sq_Z))
    if not (mu.shape == kappa.shape == lam2.shape):
        raise ValueError(
            f"coefficient sequences must have equal lengths, got {mu.shape[0]}, {kappa.shape[0]}, {lam2.shape[0]}"
        )
    for arr, nm in ((mu, "drift_Z"), (kappa, "noise_curvature_Z"), (lam2, "diffusion_sq_Z")):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{nm} has non-finite values at steps {np.flatnonzero(~np.isfinite(arr))[:5].tolist()}")
    if np.any(lam2 < 0):
        raise ValueError("diffusion_sq_Z must be non-negative")

    def cumint(f):
        return np.concatenate([[0.0], np.cumsum(f) * dt])

    Z0 = math.log(K0)
    var_Z = cumint(lam2)
    mean_Z = Z0 + cumint(mu + kappa - 0.5 * lam2)
    mean_K = K0 * np.exp(cumint(mu + kappa))
    var_K = mean_K**2 * np.expm1(var_Z)
    t = np.arange(mu.shape[0] + 1) * dt
    return LipschitzMoments(t=t, mean_Z=mean_Z, var_Z=var_Z, mean_K=mean_K, var_K=var_K)


def blank_coefficients(t: LayerTerms) -> LayerTerms:
    """The terms with every coefficient of the dynamics set to NaN (σ1, the gap and flags kept).

    For a step whose update the model does not describe (an optimizer without an update
    rule, a gradient edited elementwise before the step): the record keeps what was
    measured of θ and says, by NaN, that no coefficient was.
    """
    nan = torch.tensor(float("nan"), dtype=t.sigma1.dtype)
    blank = {x.name: nan for x in TERMS if x.coefficient and getattr(t, x.name) is not None}
    if t.diffusion_sq_var is not None:
        blank["diffusion_sq_var"] = nan
    return attrs.evolve(t, **blank)
