"""The common interface of the per-sample statistics engines (THEORY.md §6).

Every Thm 14 term of a layer θ ∈ R^{m×n} is a function of a few per-sample statistics
of the per-sample gradients g_i = ∇_θ ℓ(θ; x_i, y_i) of one mini-batch (i = 1..M):

- the projections g_i v1 (M × m) and g_iᵀ u1 (M × n) on the top singular pair (u1, v1)
  of θ — enough for the drift μ, the diffusion ‖λ‖² and the noise curvature κ
  (:func:`sdelip.dynamics.terms_from_projections`);
- Σ_i g_i and Σ_i g_i ∘ g_i (m × n) — the diagonal of Σ̂ (Prop 5–6), needed only for the
  variance/covariance split of κ.

An engine performs the step's ordinary backward pass (so that ``p.grad`` is the gradient
of the mean loss, exactly as ``losses.mean().backward()`` would leave it) and returns
these statistics for every tracked layer, in the layer's dtype. Engines differ in how
they obtain them; on models where several apply they return the same numbers:

- :class:`~sdelip.engines.factored.FactoredEngine` — hooks on the forward and backward
  pass of the user's own step, never forming per-sample gradients of Linear layers;
- :class:`~sdelip.engines.materialised.MaterialisedEngine` — ``torch.func.vmap`` over
  samples (the oracle and the fallback for independent samples);
- :class:`~sdelip.engines.coupled.CoupledEngine` — batched vector-Jacobian products of
  the per-sample losses through the shared graph (BatchNorm in training mode).
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar, Mapping, Optional, Sequence

import attrs
import torch
from torch import nn

from .._checks import NonFiniteError
from ..layers import TrackedLayer

__all__ = [
    "LayerStatistics",
    "StatisticsAccumulator",
    "Engine",
    "EngineError",
    "EngineNotApplicableError",
    "WeightUsesError",
    "coupling_modules",
    "untracked_weight_users",
    "DEFAULT_CHUNK_BYTES",
    "VECTORISED_CHUNK_BYTES",
]

#: Default memory budget of one chunk of per-sample intermediates (bytes): 8 MiB keeps a
#: chunk of per-sample conv gradients cache-friendly (fastest on the development CPU).
DEFAULT_CHUNK_BYTES = 8 * 2**20
#: Default chunk budget of the vectorised engines (materialised, coupled), whose cost per
#: chunk is dominated by one vmap'd call.
VECTORISED_CHUNK_BYTES = 32 * 2**20


class EngineError(RuntimeError):
    """An engine could not compute the per-sample statistics of a step."""


class EngineNotApplicableError(ValueError):
    """The requested engine does not apply to this model (e.g. factored with BatchNorm)."""


class WeightUsesError(EngineError):
    """A forward pass applied a tracked weight a different number of times than the tracker counts.

    The product bound K contains σ1(θ)^c for a weight applied c times (Prop 8), so the
    number of uses must be known and the same in every forward pass.
    """


@attrs.define
class LayerStatistics:
    """Per-sample statistics of one layer on one mini-batch (THEORY.md §6).

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


def coupling_modules(model: nn.Module) -> list[str]:
    """Names of the modules that couple the samples of a batch in the forward pass.

    These are the BatchNorm modules that normalise with batch statistics: in training
    mode, or in any mode with ``track_running_stats=False``. Through them ℓ_i depends on
    every sample of the batch, so the per-sample gradient is ∂ℓ_i/∂θ through the shared
    statistics and only the coupled engine computes it (THEORY.md §6).
    """
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if mod.training or mod.running_mean is None:
                out.append(name or type(mod).__name__)
    return out


def untracked_weight_users(model: nn.Module, layers: Optional[Sequence[TrackedLayer]] = None) -> dict[str, list[str]]:
    """Modules other than the tracked Linear/Conv2d modules that hold a tracked weight.

    A weight tied to, say, an nn.Embedding (``lm_head.weight = embed.weight``) is one θ
    whose per-sample gradient is the total derivative over every use, including the
    embedding's; the hooks of the factored engine see only the Linear/Conv2d uses.

    Args:
        model: the network.
        layers: its tracked layers (default :func:`sdelip.layers.tracked_layers`).

    Returns:
        tracked layer name → paths of the other modules holding its weight (only layers
        that have some).
    """
    from ..layers import tracked_layers

    if layers is None:
        try:
            layers = tracked_layers(model)
        except ValueError:
            return {}
    out: dict[str, list[str]] = {}
    for layer in layers:
        own = {id(m) for m in layer.modules}
        w = layer.module.weight
        users = [name or type(mod).__name__ for name, mod in model.named_modules()
                 if id(mod) not in own and any(p is w for p in mod._parameters.values())]
        if users:
            out[layer.name] = users
    return out


class Engine(abc.ABC):
    """Per-sample statistics engine: performs the step's backward and returns the statistics.

    Args:
        model: the network.
        layers: the tracked layers (:func:`sdelip.layers.tracked_layers`).
        split: compute Σ g_i and Σ g_i ∘ g_i for the Prop 6 split of κ.
        chunk_bytes: memory budget of one chunk of per-sample intermediates.
    """

    #: Engine name stored in the record metadata.
    name: ClassVar[str] = "engine"
    #: Whether :meth:`backward` needs the mini-batch (inputs, targets).
    needs_batch: ClassVar[bool] = False
    #: Whether the engine computes exact per-sample gradients through cross-sample couplings.
    handles_coupling: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[TrackedLayer],
        split: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        self.model = model
        self.layers = list(layers)
        self.split = bool(split)
        if int(chunk_bytes) < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes!r}")
        self.chunk_bytes = int(chunk_bytes)

    def attach(self) -> None:
        """Install hooks (if the engine uses any)."""

    def detach(self) -> None:
        """Remove hooks."""

    def arm(self, capture: bool) -> None:
        """Tell the engine whether the next forward pass belongs to a tracked step."""

    def check_applicable(self) -> None:
        """Raise :class:`EngineNotApplicableError` if the model couples samples and the engine cannot."""
        if self.handles_coupling:
            return
        mods = coupling_modules(self.model)
        if mods:
            raise EngineNotApplicableError(
                f"the {self.name} engine assumes independent samples, but {', '.join(repr(m) for m in mods)} "
                "normalise with batch statistics (BatchNorm in training mode), which couples the samples; "
                "use engine='coupled' (or engine='auto', which selects it)"
            )

    def plain_backward(self, losses: torch.Tensor) -> None:
        """The backward of an untracked step: ``losses.mean().backward()``."""
        losses.mean().backward()

    @abc.abstractmethod
    def backward(
        self,
        losses: torch.Tensor,
        directions: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        batch=None,
        step: Optional[int] = None,
    ) -> dict[str, LayerStatistics]:
        """Run the step's backward of ``losses.mean()`` and return the per-sample statistics.

        Args:
            losses: (M,) per-sample losses ℓ_i of the loss being optimised.
            directions: layer name → (u1, v1) of the layer's weight matrix.
            batch: (inputs, targets), needed by engines with :attr:`needs_batch`.
            step: the step number, for messages.

        Returns:
            layer name → :class:`LayerStatistics` of g_i = ∇_θ ℓ_i (not ℓ_i / M).
        """

    def _chunk(self, M: int, per_sample_bytes: int) -> int:
        return int(max(1, min(M, self.chunk_bytes // max(1, per_sample_bytes))))
