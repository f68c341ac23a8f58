"""Per-sample statistics of one layer on one mini-batch (docs/theory.md §8).

Every Thm 14 term of a layer θ ∈ R^{m×n} is a function of a few per-sample statistics of
the per-sample gradients g_i of one mini-batch: the projections g_i v1 and g_iᵀ u1 on the
top singular pair of θ, and Σ_i g_i, Σ_i g_i ∘ g_i for the Prop 6 split. The layer rules
(:mod:`sdelip.rules`) produce them, the engines (:mod:`sdelip.engines`) collect them.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

from .._checks import NonFiniteError

__all__ = ["EngineError", "LayerStatistics", "StatisticsAccumulator"]


class EngineError(RuntimeError):
    """An engine could not compute the per-sample statistics of a step."""


@attrs.define
class LayerStatistics:
    """Per-sample statistics of one layer on one mini-batch (docs/theory.md §8).

    Attributes:
        M: the batch size.
        Gv: (M, m) the projections g_i v1.
        Gtu: (M, n) the projections g_iᵀ u1.
        sum_g: (m, n) Σ_i g_i, or None when the split was not requested.
        sum_sq: (m, n) Σ_i g_i ∘ g_i, or None.
    """

    M: int
    Gv: torch.Tensor
    Gtu: torch.Tensor
    sum_g: Optional[torch.Tensor] = None
    sum_sq: Optional[torch.Tensor] = None

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

    def result(self) -> LayerStatistics:
        return LayerStatistics(self.M, self.Gv, self.Gtu, self.sum_g, self.sum_sq)


