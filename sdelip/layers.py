"""Which parameters make up the Lipschitz bound K (Prop 8, Prop 9).

The tracked layers are the weights of the ``nn.Linear`` and ``nn.Conv2d`` modules, in
forward order, named by the module path of their first use. Biases, normalisation
affine parameters and everything else are not part of θ (Prop 9) and are ignored.

A tracked layer is one weight Parameter θ. Tied weights — several modules holding the
same Parameter (``b.weight = a.weight``), or one module called several times in a
forward pass — make one layer applied c > 1 times (:attr:`TrackedLayer.uses`): one
operator norm σ1(θ), one per-sample gradient (the total derivative over all uses), and
the factor σ1(θ)^c in the product bound K, since Prop 8 multiplies the norms of the maps
composed in the forward pass (docs/tracking.md, "Tied weights").

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


def _calls_default(layer: "TrackedLayer") -> tuple:
    return (1,) * (1 + len(layer.aliases))


@attrs.frozen
class TrackedLayer:
    """A weight matrix θ^(ℓ) of the network: one Parameter, applied :attr:`uses` times per forward pass.

    Attributes:
        name: module path of the first module applying θ, e.g. ``"features.0"``.
        module: that nn.Linear or nn.Conv2d module.
        shape: (m, n) of the weight matrix (Conv2d: (out, in·kh·kw)).
        aliases: module paths of the other nn.Linear / nn.Conv2d modules holding the same
            Parameter (tied weights), in forward order; () for an ordinary layer.
        calls: how many times each module (``name``, then ``aliases``) applies θ in one
            forward pass; a module that the counting forward pass did not call counts once,
            as every tracked module does without one.
        alias_modules: the modules named by ``aliases``.
    """

    name: str
    module: nn.Module = attrs.field(eq=False, repr=False)
    shape: tuple
    aliases: tuple = ()
    calls: tuple = attrs.field(default=attrs.Factory(_calls_default, takes_self=True))
    alias_modules: tuple = attrs.field(default=(), eq=False, repr=False)

    @calls.validator
    def _check_calls(self, attribute, value):
        if len(value) != 1 + len(self.aliases) or any(int(c) < 1 for c in value):
            raise ValueError(f"calls of layer {self.name!r} must be one positive count per module, got {value!r}")

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def uses(self) -> int:
        """c, the number of times θ is applied in one forward pass: K contains σ1(θ)^c (Prop 8)."""
        return int(sum(self.calls))

    @property
    def module_names(self) -> tuple:
        """The paths of every module applying θ: ``name``, then the ``aliases``."""
        return (self.name, *self.aliases)

    @property
    def modules(self) -> tuple:
        """Every module applying θ: ``module``, then the ``alias_modules``."""
        return (self.module, *self.alias_modules)

    def matrix(self) -> torch.Tensor:
        """The current weight matrix (a view of the module's weight)."""
        return weight_matrix(self.module.weight)


def _count_calls(model: nn.Module, found, example_input: torch.Tensor) -> tuple[list[str], dict[str, int]]:
    """One forward pass (no grad, eval mode): the order of first calls and the calls per module."""
    order: list[str] = []
    calls: dict[str, int] = {}

    def hook(module, inputs, output, name):
        if name not in calls:
            order.append(name)
        calls[name] = calls.get(name, 0) + 1

    handles = [mod.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name)) for name, mod in found]
    was_training = model.training
    model.eval()  # no dropout draws, no running-statistics updates
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order, calls


def tracked_layers(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> list[TrackedLayer]:
    """The trackable layers of ``model`` in forward order, one per distinct weight Parameter.

    Args:
        model: any nn.Module.
        example_input: if given, one forward pass (no grad, eval mode) records the order
            in which the layers are called and how many times each module is called
            (:attr:`TrackedLayer.calls`); otherwise the registration order is used, which
            is the forward order for nn.Sequential-style models, and every module is
            assumed to be called once.

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
    calls: dict[str, int] = {}
    if example_input is not None:
        order, calls = _count_calls(model, found, example_input)
        rank = {name: k for k, name in enumerate(order)}
        found.sort(key=lambda nm: rank.get(nm[0], len(rank)))
    groups: dict[tuple, list] = {}  # modules sharing one weight Parameter, in forward order
    for name, mod in found:
        p = mod._parameters.get("weight")  # a weight computed on access (parametrizations) is its module's own
        groups.setdefault(("parameter", id(p)) if p is not None else ("module", id(mod)), []).append((name, mod))
    layers = []
    for group in groups.values():
        (name, mod), rest = group[0], group[1:]
        layers.append(TrackedLayer(
            name=name, module=mod, shape=tuple(weight_matrix(mod.weight).shape),
            aliases=tuple(n for n, _ in rest), calls=tuple(max(1, calls.get(n, 1)) for n, _ in group),
            alias_modules=tuple(m for _, m in rest),
        ))
    return layers
