"""The realised one-step change of σ1 from the update actually applied (Lemma 12–13).

For a weight matrix θ = Σ σ_j u_j v_jᵀ with a simple top singular value and an update Δ,

    σ1(θ + Δ) − σ1(θ) = u1ᵀΔv1 + ½·Q(Δ) + O(‖Δ‖³),   Q(Δ) = vec(Δ)ᵀ H vec(Δ),

the first term the operator norm's Jacobian J = v1 ⊗ u1 applied to Δ (Lemma 12), the second
its Hessian H (Lemma 13) as a quadratic form. H is evaluated matrix-free from the two
projections a = Δv1 and b = Δᵀu1 (docs/theory.md §5): with a_k = u_kᵀa, b_k = v_kᵀb and
w_k = 1/(σ1² − σ_k²),

    Q(Δ) = Σ_{k≥2} w_k [σ1(a_k² + b_k²) + 2σ_k a_k b_k] + (‖a‖² − Σ_k a_k²)/σ1 + (‖b‖² − Σ_k b_k²)/σ1

as computed by the decomposition's ``hessian_quadform`` (the last two terms are the null
spaces of a non-square θ; :class:`~sdelip.core.decompositions.GramCurvature` evaluates the
same form through its resolvent), so the cost is two matrix-vector
products and whatever the decomposition route costs (:func:`sdelip.core.spectral.decompose`
or :func:`sdelip.core.decompositions.decompose_layer`).

The expansion holds for any update — it knows nothing about the optimizer — which makes it
the reference the optimizer rules' models (:mod:`sdelip.optim`) are compared with.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RealisedIncrement", "realised_increment"]


class RealisedIncrement(NamedTuple):
    """(u1ᵀΔv1, ½·Q(Δ)) of one update Δ; ``total`` is their sum, σ1(θ + Δ) − σ1(θ) to O(‖Δ‖³)."""

    first: torch.Tensor
    half_curvature: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.first + self.half_curvature


def realised_increment(decomposition, delta: torch.Tensor) -> RealisedIncrement:
    """(u1ᵀΔv1, ½·vec(Δ)ᵀ H vec(Δ)) for an update Δ of the decomposed matrix θ.

    Args:
        decomposition: a :class:`~sdelip.core.spectral.SpectralDecomposition` or a
            :class:`~sdelip.core.decompositions.GramCurvature` of θ (m × n); anything with
            ``u1``, ``v1`` and ``hessian_quadform(Δv1, Δᵀu1)`` in θ's orientation.
        delta: Δ as an m × n matrix (a parameter's update through its layer rule's
            ``matrix``, e.g. a conv kernel's (out, in/groups·k…) view).

    Returns:
        :class:`RealisedIncrement` of two 0-dim tensors.

    Raises:
        ValueError: Δ is not a matrix of θ's shape.
    """
    u1, v1 = decomposition.u1, decomposition.v1
    shape = (u1.shape[0], v1.shape[0])
    if delta.ndim != 2 or tuple(delta.shape) != shape:
        raise ValueError(f"realised_increment: the update has shape {tuple(delta.shape)}, the decomposed matrix "
                         f"{shape}; reshape a parameter's update with its layer rule's matrix()")
    delta = delta.detach().to(dtype=u1.dtype)
    a = delta @ v1
    b = delta.mT @ u1
    first = u1 @ a
    return RealisedIncrement(first, 0.5 * decomposition.hessian_quadform(a, b))
