"""The common interface of the per-sample statistics engines (docs/theory.md §8).

Every Thm 14 term of a layer θ ∈ R^{m×n} is a function of a few per-sample statistics
of the per-sample gradients g_i = ∇_θ ℓ(θ; x_i, y_i) of one mini-batch (i = 1..M):

- the projections g_i v1 (M × m) and g_iᵀ u1 (M × n) on the top singular pair (u1, v1)
  of θ — enough for the drift μ, the diffusion ‖λ‖² and the noise curvature κ
  (:func:`sdelip.core.formulas.terms_from_projections`);
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
from typing import TYPE_CHECKING, ClassVar, Mapping, Optional, Sequence

import torch
from torch import nn

from .._checks import NonFiniteError  # noqa: F401  (re-exported)
from ..core.statistics import EngineError, LayerStatistics, ScaleFn, StatisticsAccumulator
from ..errors import EngineNotApplicableError, WeightUsesError  # noqa: F401  (defined there, re-exported)

if TYPE_CHECKING:  # the layers import the rules, which import these containers
    from ..rules.inventory import TrackedLayer

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
    "second_order_node",
]

#: Default memory budget of one chunk of per-sample intermediates (bytes): 8 MiB keeps a
#: chunk of per-sample conv gradients cache-friendly (fastest on the development CPU).
DEFAULT_CHUNK_BYTES = 8 * 2**20
#: Default chunk budget of the vectorised engines (materialised, coupled), whose cost per
#: chunk is dominated by one vmap'd call.
VECTORISED_CHUNK_BYTES = 32 * 2**20


def coupling_modules(model: nn.Module) -> list[str]:
    """Names of the modules that couple the samples of a batch in the forward pass.

    These are the BatchNorm modules that normalise with batch statistics: in training
    mode, or in any mode with ``track_running_stats=False``. Through them ℓ_i depends on
    every sample of the batch, so the per-sample gradient is ∂ℓ_i/∂θ through the shared
    statistics and only the coupled engine computes it (docs/theory.md §8).
    """
    from ..rules import rule_for

    out = []
    for name, mod in model.named_modules():
        rule = rule_for(mod)
        if rule is not None and rule.couples_samples(mod):
            out.append(name or type(mod).__name__)
    return out


def untracked_weight_users(model: nn.Module, layers: Optional[Sequence["TrackedLayer"]] = None) -> dict[str, list[str]]:
    """Modules holding a tracked weight that none of the layer's rules watches for it.

    Every module holding a weight matrix normally has a rule claiming it (or the
    per-module fallback), so the weight's uses are all reported; a module holding it
    under another name (a custom module keeping a reference to another module's weight)
    would apply it unseen.

    Args:
        model: the network.
        layers: its tracked layers (default :func:`sdelip.rules.inventory.tracked_layers`).

    Returns:
        tracked layer name → paths of the other modules holding its weight (only layers
        that have some).
    """
    from ..rules.inventory import tracked_layers
    from ..rules.base import get_attr as _get_attr

    if layers is None:
        try:
            layers = tracked_layers(model)
        except ValueError:
            return {}
    out: dict[str, list[str]] = {}
    for layer in layers:
        own = set()
        for module, attr, _ in layer.users:  # the module applying θ and the submodule holding it
            owner = attr.rpartition(".")[0]
            own |= {id(module), id(_get_attr(module, owner) if owner else module)}
        w = layer.weight
        users = [name or type(mod).__name__ for name, mod in model.named_modules()
                 if id(mod) not in own and any(p is w for p in mod._parameters.values())]
        if users:
            out[layer.name] = users
    return out


def second_order_node(losses: torch.Tensor) -> Optional[str]:
    """The name of a double-backward node in the graph of ``losses`` (``TanhBackwardBackward0``), else None.

    Such a node exists when the losses contain a gradient taken with ``create_graph=True``
    (a gradient penalty ℓ + λ‖∂ℓ/∂x‖²): the weights then enter the losses also through the
    backward graph of that gradient, not only through the layers' outputs.
    """
    fn = losses.grad_fn
    if fn is None:
        return None
    seen, stack = {fn}, [fn]
    while stack:
        node = stack.pop()
        name = type(node).__name__
        if "BackwardBackward" in name:
            return name
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return None


class Engine(abc.ABC):
    """Per-sample statistics engine: performs the step's backward and returns the statistics.

    Args:
        model: the network.
        layers: the tracked layers (:func:`sdelip.rules.inventory.tracked_layers`).
        split: compute Σ g_i and Σ g_i ∘ g_i for the Prop 6 split of κ.
        chunk_bytes: memory budget of one chunk of per-sample intermediates.
    """

    #: Engine name stored in the record metadata.
    name: ClassVar[str] = "engine"
    #: Whether :meth:`backward` needs the mini-batch (inputs, targets).
    needs_batch: ClassVar[bool] = False
    #: Whether the engine computes exact per-sample gradients through cross-sample couplings.
    handles_coupling: ClassVar[bool] = False
    #: Whether the engine's per-sample gradients are those of a forward pass run under
    #: ``torch.autocast`` (it differentiates the step's own graph, casts included).
    handles_autocast: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence["TrackedLayer"],
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
        scale: Optional[ScaleFn] = None,
    ) -> dict[str, LayerStatistics]:
        """Run the step's backward of ``losses.mean()`` and return the per-sample statistics.

        Args:
            losses: (M,) per-sample losses ℓ_i of the loss being optimised.
            directions: layer name → (u1, v1) of the layer's weight matrix.
            batch: (inputs, targets), needed by engines with :attr:`needs_batch`.
            step: the step number, for messages.
            scale: optional ``scale(name, mean_grad, noise_var) -> Optional[Tensor]``, called
                per layer after the backward with ḡ = Σ_i g_i / M and diag Σ̂
                (:meth:`LayerStatistics.noise_var`), both (m, n); Σ g_i and Σ g_i ∘ g_i are
                then computed whatever ``split``. When it returns an elementwise preconditioner
                S (m, n) (an optimizer's ∂P/∂g, Adam's D), the layer's ``Gv`` and ``Gtu`` are
                (S ∘ g_i) v1 and (S ∘ g_i)ᵀ u1, ``sum_g`` and ``sum_sq`` stay those of the raw
                g_i, and ``LayerStatistics.scale`` is S; None leaves the layer unchanged.
                Without ``scale`` nothing changes.

        Returns:
            layer name → :class:`LayerStatistics` of g_i = ∇_θ ℓ_i (not ℓ_i / M).

        Raises:
            EngineError: ``scale`` returned something other than None or an (m, n) tensor
                (named layer and step).
        """

    def _chunk(self, M: int, per_sample_bytes: int) -> int:
        return int(max(1, min(M, self.chunk_bytes // max(1, per_sample_bytes))))
