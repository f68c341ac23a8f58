"""Per-sample statistics of one layer on one mini-batch (docs/theory.md §8).

Every Thm 14 term of a layer θ ∈ R^{m×n} is a function of a few per-sample statistics of
the per-sample gradients g_i of one mini-batch: the projections g_i v1 and g_iᵀ u1 on the
top singular pair of θ, and Σ_i g_i, Σ_i g_i ∘ g_i for the Prop 6 split. The layer rules
(:mod:`sdelip.rules`) produce them, the engines (:mod:`sdelip.engines`) collect them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import attrs
import torch

from .._checks import NonFiniteError
from ..errors import EngineError  # noqa: F401  (defined there, re-exported)

__all__ = ["EngineError", "LayerStatistics", "StatisticsAccumulator", "ScaleFn", "scaled_projections",
           "check_scale"]

#: ``scale(name, mean_grad, noise_var) -> Optional[Tensor]``: the elementwise preconditioner S
#: (m, n) of a layer from its mini-batch mean gradient ḡ and diag Σ̂ (both (m, n)), or None.
ScaleFn = Callable[[str, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


@attrs.define
class LayerStatistics:
    """Per-sample statistics of one layer on one mini-batch (docs/theory.md §8).

    Attributes:
        M: the batch size.
        Gv: (M, m) the projections g_i v1.
        Gtu: (M, n) the projections g_iᵀ u1.
        sum_g: (m, n) Σ_i g_i, or None when the split was not requested.
        sum_sq: (m, n) Σ_i g_i ∘ g_i, or None.
        scale: (m, n) the elementwise preconditioner S of an engine's ``backward(..., scale=)``,
            or None. When set, ``Gv`` and ``Gtu`` are the projections of the preconditioned
            per-sample gradients, (S ∘ g_i) v1 and (S ∘ g_i)ᵀ u1, while ``sum_g`` and
            ``sum_sq`` stay those of the raw g_i (so :meth:`mean` and :meth:`noise_var`
            are ḡ and diag Σ̂ of the raw gradients).
    """

    M: int
    Gv: torch.Tensor
    Gtu: torch.Tensor
    sum_g: Optional[torch.Tensor] = None
    sum_sq: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None

    def mean(self) -> Optional[torch.Tensor]:
        """ḡ, the mini-batch mean gradient (m, n)."""
        return None if self.sum_g is None else self.sum_g / self.M

    def noise_var(self) -> Optional[torch.Tensor]:
        """diag Σ̂ = Σ_i (g_i − ḡ)² / (M(M − 1)) as an (m, n) matrix (Prop 5, Prop 6)."""
        if self.sum_sq is None or self.sum_g is None:
            return None
        M = self.M
        out = torch.addcmul(self.sum_sq, self.sum_g, self.sum_g, value=-1.0 / M)
        return out.mul_(1.0 / (M * (M - 1))).clamp_min_(0.0)

    def check_finite(self, name: str, step: Optional[int]) -> None:
        """Raise :class:`NonFiniteError` naming the layer and step if any statistic is NaN/Inf."""
        for label, x in (("g_i v1", self.Gv), ("g_iᵀ u1", self.Gtu), ("Σ g_i", self.sum_g), ("Σ g_i²", self.sum_sq)):
            # a NaN or Inf anywhere makes the sum non-finite: one reduction on the good path
            if x is not None and not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
                n_bad = int((~torch.isfinite(x)).sum())
                at = f" at step {step}" if step is not None else ""
                raise NonFiniteError(
                    f"the per-sample gradients of layer {name!r}{at} are not finite: {n_bad} NaN/Inf value(s) in "
                    f"the statistic {label} (a NaN or Inf gradient flowed back into this layer)"
                )

    def scale_(self, s: float) -> "LayerStatistics":
        """Multiply the per-sample gradients by ``s`` (undoes the 1/M of a mean-reduced backward)."""
        self.Gv.mul_(s)
        self.Gtu.mul_(s)
        if self.sum_g is not None:
            self.sum_g.mul_(s)
        if self.sum_sq is not None:
            self.sum_sq.mul_(s * s)
        return self


def scaled_projections(G: torch.Tensor, S: torch.Tensor, u1: torch.Tensor,
                       v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections of preconditioned per-sample gradients: (S ∘ g_i) v1 and (S ∘ g_i)ᵀ u1.

    Args:
        G: (c, m, n) per-sample gradients g_i (materialised).
        S: (m, n) the elementwise preconditioner.
        u1: (m,), v1: (n,) the top singular pair.

    Returns:
        (c, m) and (c, n).
    """
    SG = G * S
    return SG @ v1, SG.mT @ u1


def check_scale(S, shape: tuple, like: torch.Tensor, name: str, step: Optional[int]) -> Optional[torch.Tensor]:
    """The preconditioner returned by a ``scale`` callable as an (m, n) tensor of ``like``'s dtype/device.

    Raises:
        EngineError: naming the layer and step, when S is not a tensor of shape (m, n).
    """
    if S is None:
        return None
    at = f" at step {step}" if step is not None else ""
    if not isinstance(S, torch.Tensor) or tuple(S.shape) != tuple(shape):
        got = tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__
        raise EngineError(
            f"the scale callable returned {got} for layer {name!r}{at}; it must return None or an elementwise "
            f"preconditioner S of the layer's weight-matrix shape {tuple(shape)}"
        )
    return S.detach().to(dtype=like.dtype, device=like.device)


class StatisticsAccumulator:
    """Builds :class:`LayerStatistics` chunk by chunk without keeping per-sample gradients.

    Args:
        M: batch size.
        shape: (m, n) of the weight matrix.
        u1, v1: the top singular vectors of θ.
        split: also accumulate Σ g_i and Σ g_i ∘ g_i.
    """

    def __init__(self, M: int, shape: tuple[int, int], u1: torch.Tensor, v1: torch.Tensor, split: bool):
        m, n = shape
        self.M, self.u1, self.v1, self.split = M, u1, v1, split
        kw = dict(dtype=u1.dtype, device=u1.device)
        self.Gv = torch.empty(M, m, **kw)
        self.Gtu = torch.empty(M, n, **kw)
        self.sum_g = torch.zeros(m, n, **kw) if split else None
        self.sum_sq = torch.zeros(m, n, **kw) if split else None

    def add_per_sample(self, start: int, G: torch.Tensor, overwrite: bool = False) -> None:
        """Add the materialised per-sample gradients G (c, m, n) of samples start..start+c−1.

        Args:
            start: index of the first sample of the chunk.
            G: the per-sample gradients of this layer's weight.
            overwrite: G belongs to the caller alone and may be squared in place (saves a
                copy of the chunk); otherwise G is left unchanged.
        """
        c = G.shape[0]
        converted = G.dtype != self.u1.dtype
        G = G.to(self.u1.dtype)
        torch.matmul(G, self.v1, out=self.Gv[start : start + c])
        torch.matmul(G.mT, self.u1, out=self.Gtu[start : start + c])
        if self.split:
            self.sum_g += G.sum(0)
            self.sum_sq += (G.square_() if overwrite or converted else G.square()).sum(0)

    def add_projections(self, start: int, Gv: torch.Tensor, Gtu: torch.Tensor) -> None:
        c = Gv.shape[0]
        self.Gv[start : start + c] = Gv
        self.Gtu[start : start + c] = Gtu

    def add_scaled(self, start: int, G: torch.Tensor, S: torch.Tensor) -> None:
        """Store the projections (S ∘ g_i) v1, (S ∘ g_i)ᵀ u1 of per-sample gradients G (c, m, n) of samples
        start..start+c−1 (a second pass over the samples, once S is known; Σ g_i and Σ g_i² untouched)."""
        Gv, Gtu = scaled_projections(G.to(self.u1.dtype), S, self.u1, self.v1)
        self.add_projections(start, Gv, Gtu)

    def result(self) -> LayerStatistics:
        return LayerStatistics(self.M, self.Gv, self.Gtu, self.sum_g, self.sum_sq)
