"""Which parameters make up the Lipschitz bound K (Prop 8, Prop 9).

The tracked layers are the weight-carrying ``nn.Linear`` and ``nn.Conv2d`` modules,
in forward order, named by their module path. Biases, normalisation affine
parameters and everything else are not part of θ (Prop 9) and are ignored.

The product bound of Prop 8 assumes a feed-forward chain: it ignores skip
connections (a residual block x + f(x) has Lipschitz constant up to 1 + Lip(f), not
Lip(f)), and it treats every activation as 1-Lipschitz. For models with skip
connections the tracked K is the product of the tracked layers' norms, which is
not an upper bound of the network's Lipschitz constant.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
from torch import nn

from .spectral import weight_matrix

__all__ = ["TrackedLayer", "tracked_layers", "NoTrackableLayerError"]

TRACKABLE = (nn.Linear, nn.Conv2d)


class NoTrackableLayerError(ValueError):
    """The model has no nn.Linear or nn.Conv2d weight to track."""


@attrs.frozen
class TrackedLayer:
    """A weight matrix θ^(ℓ) of the network.

    Attributes:
        name: module path, e.g. ``"features.0"``.
        module: the nn.Linear or nn.Conv2d module.
        shape: (m, n) of the weight matrix (Conv2d: (out, in·kh·kw)).
    """

    name: str
    module: nn.Module = attrs.field(eq=False, repr=False)
    shape: tuple

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    def matrix(self) -> torch.Tensor:
        """The current weight matrix (a view of the module's weight)."""
        return weight_matrix(self.module.weight)


def tracked_layers(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> list[TrackedLayer]:
    """The trackable layers of ``model`` in forward order.

    Args:
        model: any nn.Module.
        example_input: if given, one forward pass (no grad) records the order in which
            the layers are called; otherwise the registration order is used, which is
            the forward order for nn.Sequential-style models.

    Raises:
        NoTrackableLayerError: no nn.Linear / nn.Conv2d with a weight.
    """
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, TRACKABLE) and isinstance(getattr(mod, "weight", None), torch.Tensor)
        and mod.weight.requires_grad
    ]
    if not found:
        raise NoTrackableLayerError(
            f"{type(model).__name__} has no trainable nn.Linear or nn.Conv2d weight: nothing to track "
            "(the Lipschitz bound K is the product of their operator norms, Prop 8–9)"
        )
    if example_input is not None:
        order: list[str] = []
        handles = [
            mod.register_forward_hook(lambda m, i, o, name=name: order.append(name) if name not in order else None)
            for name, mod in found
        ]
        was_training = model.training
        model.eval()  # no dropout draws, no running-statistics updates
        try:
            with torch.no_grad():
                model(example_input)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        rank = {name: k for k, name in enumerate(order)}
        found.sort(key=lambda nm: rank.get(nm[0], len(rank)))
    return [TrackedLayer(name=name, module=mod, shape=tuple(weight_matrix(mod.weight).shape)) for name, mod in found]
