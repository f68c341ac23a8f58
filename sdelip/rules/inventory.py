"""Which parameters make up the Lipschitz bound K (Prop 8, Prop 9), found through the layer rules.

The tracked layers are the weight matrices that a rule of :mod:`sdelip.rules` names
(Linear, Conv1d/2d/3d, Embedding, MultiheadAttention's projections) in forward order, and
with ``unsupported="fallback"`` every other trainable parameter with at least two
dimensions (tracked exactly by the per-module fallback); with ``unsupported="error"``
such a parameter is refused by name. A module's ``.weight`` is named by the module path
of its first use (``"features.0"``), any other weight matrix by its full parameter name
(``"enc.layers.0.self_attn.in_proj_weight"``). Biases, normalisation affine parameters and
other vectors are not part of θ (Prop 9); :func:`weight_inventory` lists every parameter
that is not tracked, and why.

A tracked layer is one weight Parameter θ. Tied weights — several modules holding the
same Parameter (``b.weight = a.weight``, an embedding tied to the output head), or one
module called several times in a forward pass — make one layer applied c > 1 times
(:attr:`TrackedLayer.uses`): one operator norm σ1(θ), one per-sample gradient (the total
derivative over all uses), and the factor σ1(θ)^c in the product bound K, since Prop 8
multiplies the norms of the maps composed in the forward pass (docs/tracking.md, "Tied
weights").

The product bound of Prop 8 assumes a feed-forward chain: it ignores skip
connections (a residual block x + f(x) has Lipschitz constant up to 1 + Lip(f), not
Lip(f)), and it treats every activation as 1-Lipschitz. For models with skip
connections the tracked K is the product of the tracked layers' norms, which is
not an upper bound of the network's Lipschitz constant.
"""

from __future__ import annotations

from collections.abc import Mapping

import math
from typing import Optional

import attrs
import torch
from torch import nn

from .. import rules as _rules
from . import FALLBACK, Claim, LayerRule
from ..errors import NoTrackableLayerError, UnsupportedLayerError  # noqa: F401  (defined there, re-exported)

__all__ = ["TrackedLayer", "tracked_layers", "weight_inventory", "LeftOut", "NoTrackableLayerError",
           "UnsupportedLayerError", "UNSUPPORTED", "operator_norms", "product_norm"]

#: What :func:`tracked_layers` does with a weight matrix that no rule names.
UNSUPPORTED = ("fallback", "error")


def _calls_default(layer: "TrackedLayer") -> tuple:
    return (1,) * (1 + len(layer.aliases))


@attrs.frozen
class TrackedLayer:
    """A weight matrix θ^(ℓ) of the network: one Parameter, applied :attr:`uses` times per forward pass.

    Attributes:
        name: the layer name: the module path of the first module applying θ when θ is
            its ``.weight`` (``"features.0"``), else the full parameter name
            (``"enc.layers.0.self_attn.in_proj_weight"``).
        module: the module whose rule applies θ first (for MultiheadAttention's
            projections, the attention module).
        shape: (m, n) of the weight matrix (Conv: (out, in/groups·prod(kernel))).
        aliases: module paths of the other modules holding the same Parameter (tied
            weights), in forward order; () for an ordinary layer.
        calls: how many times each module (``module``, then ``alias_modules``) applies θ in
            one forward pass, observed by the counting forward pass of ``example_input``: a
            module it did not call counts 0 (uses counted, not modules); without one every
            module counts once.
        alias_modules: the modules named by ``aliases``.
        attr: θ's attribute path on ``module`` (``"weight"``, ``"in_proj_weight"``,
            ``"out_proj.weight"``).
        alias_attrs: θ's attribute path on each alias module.
        rules: the :class:`~sdelip.rules.LayerRule` of ``module``, then of each alias.
        module_path: the path of ``module`` (the name of a ``.weight`` layer).
    """

    name: str
    module: nn.Module = attrs.field(eq=False, repr=False)
    shape: tuple
    aliases: tuple = ()
    calls: tuple = attrs.field(default=attrs.Factory(_calls_default, takes_self=True))
    alias_modules: tuple = attrs.field(default=(), eq=False, repr=False)
    attr: str = "weight"
    alias_attrs: tuple = attrs.field(default=attrs.Factory(lambda self: ("weight",) * len(self.aliases),
                                                           takes_self=True), eq=False, repr=False)
    rules: tuple = attrs.field(default=(), eq=False, repr=False)
    module_path: Optional[str] = attrs.field(default=None, eq=False, repr=False)

    @calls.validator
    def _check_calls(self, attribute, value):
        if len(value) != 1 + len(self.aliases) or any(int(c) < 0 for c in value) or sum(map(int, value)) < 1:
            raise ValueError(f"calls of layer {self.name!r} must be one count per module (0 for a module holding θ "
                             f"that is never called), at least one use in all, got {value!r}")

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def rule(self) -> LayerRule:
        """The rule of the first module applying θ."""
        return self.rules[0] if self.rules else _rule_or_fallback(self.module, self.attr)

    @property
    def weight(self) -> torch.Tensor:
        """θ as a Parameter (the tensor the optimizer updates)."""
        return _rules.base.get_attr(self.module, self.attr)

    @property
    def parameter_name(self) -> str:
        """θ's full parameter name in the model (``"fc1.weight"``, ``"enc.layers.0.self_attn.in_proj_weight"``)."""
        path = self.module_path if self.module_path is not None else self.name
        return f"{path}.{self.attr}" if path else self.attr

    @property
    def uses(self) -> int:
        """c, the number of times θ is applied in one forward pass: K contains σ1(θ)^c (Prop 8)."""
        return int(sum(self.calls))

    @property
    def module_names(self) -> tuple:
        """The paths of every module applying θ: ``module``, then the ``aliases``."""
        return (self.module_path if self.module_path is not None else self.name, *self.aliases)

    @property
    def modules(self) -> tuple:
        """Every module applying θ: ``module``, then the ``alias_modules``."""
        return (self.module, *self.alias_modules)

    @property
    def users(self) -> tuple:
        """(module, attribute path, rule) of every module applying θ."""
        rules = self.rules or tuple(_rule_or_fallback(m, a) for m, a in zip(self.modules, (self.attr, *self.alias_attrs)))
        return tuple(zip(self.modules, (self.attr, *self.alias_attrs), rules))

    def matrix(self) -> torch.Tensor:
        """The current weight matrix (a view of the weight, Prop 9)."""
        return self.rule.matrix(self.weight)


def _rule_or_fallback(module: nn.Module, attr: str) -> LayerRule:
    rule = _rules.rule_for(module)
    return rule if rule is not None and attr in rule.weights(module) else FALLBACK


@attrs.frozen
class LeftOut:
    """A parameter that is not a tracked weight matrix, and why."""

    name: str
    shape: tuple
    reason: str


def call_model(model: nn.Module, example_input):
    """``model(example_input)``; a tuple is the positional arguments, a dict the keyword arguments."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


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
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order, calls


def _all_claims(model: nn.Module, unsupported: str) -> tuple[list[Claim], list[LeftOut]]:
    """Rule claims, fallback claims for the other weight matrices, and the parameters left out."""
    if unsupported not in UNSUPPORTED:
        raise ValueError(f"unsupported must be one of {UNSUPPORTED}, got {unsupported!r}")
    found = _rules.claims(model)
    for c in found:
        c.rule.check_module(c.module, c.path or type(c.module).__name__)
    claimed = {id(c.parameter) for c in found}
    for c in found:  # a parametrized weight (computed on access) is made from its parametrization's originals
        owner, _, last = c.attr.rpartition(".")
        holder = c.module.get_submodule(owner) if owner else c.module
        plist = getattr(getattr(holder, "parametrizations", None), last, None)
        if plist is not None:
            claimed |= {id(p) for p in plist.parameters()}
    names = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), pname)
    covered_by = {}  # parameter → the rule module that covers its owner
    for c in found:
        for sub in c.rule.covers(c.module):
            owner = _rules.base.get_attr(c.module, sub)
            for p in owner.parameters():
                covered_by[id(p)] = c
    left: list[LeftOut] = []
    seen = set()
    for path, mod in model.named_modules():
        rule = _rules.rule_for(mod)
        for pn, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{path}.{pn}" if path else pn
            if id(p) in claimed:
                if not p.requires_grad:
                    left.append(LeftOut(full, tuple(p.shape), "frozen (requires_grad=False)"))
                continue
            if p.ndim < 2 and not (rule is not None and rule.name == "normalization"):
                # shape, not name: a table of two or more dimensions called "...bias..." (Swin's
                # relative_position_bias_table, LeViT's attention_biases) is a weight like any other
                why = "a bias, not part of θ (Prop 9)" if "bias" in pn else "a vector (scale/shift), not part of θ (Prop 9)"
                left.append(LeftOut(full, tuple(p.shape), why))
                continue
            if not p.requires_grad:
                left.append(LeftOut(full, tuple(p.shape), "frozen (requires_grad=False)"))
                continue
            if rule is not None or id(p) in covered_by:
                owner = rule.name if rule is not None else covered_by[id(p)].rule.name
                why = "an elementwise scale or shift of a normalisation layer, not part of θ (Prop 9)" \
                    if owner == "normalization" else f"not a weight matrix of the {owner} rule"
                left.append(LeftOut(full, tuple(p.shape), why))
                continue
            if unsupported == "error":
                raise UnsupportedLayerError(
                    f"the weight matrix {full!r} {tuple(p.shape)} of {type(mod).__name__} has no layer rule "
                    "(sdelip.rules); track it exactly with the per-module fallback (unsupported='fallback', the "
                    "default), freeze it, or add a rule for the module type (docs/tracking.md, 'Adding a layer type')"
                )
            found.append(Claim(path, mod, FALLBACK, pn))
    found = [c for c in found if c.parameter.requires_grad]
    return found, left


def _weight_key(c: Claim) -> tuple:
    """A weight Parameter's identity; a weight computed on access (parametrizations) is its module's own."""
    owner, _, last = c.attr.rpartition(".")
    holder = c.module.get_submodule(owner) if owner else c.module
    p = holder._parameters.get(last)
    return ("parameter", id(p)) if p is not None else ("module", id(holder), last)


def weight_inventory(model: nn.Module, unsupported: str = "fallback",
                     example_input=None) -> tuple[list[TrackedLayer], list[LeftOut]]:
    """The tracked layers and every parameter left out, with the reason.

    Args:
        model: any nn.Module.
        unsupported: ``"fallback"`` (track a weight matrix without a rule by the exact
            per-module fallback, :mod:`sdelip.rules.fallback`) or ``"error"`` (refuse it
            by name, :class:`UnsupportedLayerError`).
        example_input: as in :func:`tracked_layers`.
    """
    found, left = _all_claims(model, unsupported)
    if not found:
        raise NoTrackableLayerError(
            f"{type(model).__name__} has no trainable weight matrix (Linear, Conv, Embedding, attention, or any "
            "parameter with two or more dimensions): nothing to track (the Lipschitz bound K is the product of "
            "their operator norms, Prop 8–9)"
        )
    calls: dict[str, int] = {}
    if example_input is not None:
        mods = {}
        for c in found:
            mods.setdefault(c.path, c.module)
        order, calls = _count_calls(model, list(mods.items()), example_input)
        rank = {name: k for k, name in enumerate(order)}
        found.sort(key=lambda c: rank.get(c.path, len(rank)))
    groups: dict[tuple, list[Claim]] = {}  # claims of one weight Parameter, in forward order
    for c in found:
        groups.setdefault(_weight_key(c), []).append(c)
    layers = []
    for group in groups.values():
        if example_input is not None:
            # uses counted, not modules: a module holding θ that the forward pass never calls (T5's
            # `shared`, whose tied copies encoder/decoder.embed_tokens and lm_head apply it) counts 0
            counts = tuple(calls.get(c.path, 0) for c in group)
            if sum(counts) == 0:
                for c in group:
                    left.append(LeftOut(".".join(p for p in (c.path, c.attr) if p), tuple(c.parameter.shape),
                                        "not applied in the forward pass of example_input (no use: not part of "
                                        "the map whose Lipschitz bound K is tracked)"))
                continue
        else:
            counts = tuple(1 for _ in group)
        first, rest = group[0], group[1:]
        W = first.rule.matrix(first.parameter)
        layers.append(TrackedLayer(
            name=first.layer_name, module=first.module, shape=tuple(W.shape),
            aliases=tuple(c.path for c in rest), calls=counts,
            alias_modules=tuple(c.module for c in rest), attr=first.attr,
            alias_attrs=tuple(c.attr for c in rest), rules=tuple(c.rule for c in group), module_path=first.path,
        ))
    if not layers:
        raise NoTrackableLayerError(
            f"no trainable weight matrix of {type(model).__name__} is applied in the forward pass of example_input: "
            "nothing to track")
    return layers, left


def tracked_layers(model: nn.Module, example_input=None,
                   unsupported: str = "fallback") -> list[TrackedLayer]:
    """The tracked layers of ``model`` in forward order, one per distinct weight Parameter.

    Args:
        model: any nn.Module.
        example_input: if given, one forward pass (no grad, eval mode) records the order
            in which the layers are called and how many times each module is called
            (:attr:`TrackedLayer.calls`; a module holding a tied weight that is never called
            counts 0, and a weight that no module applies is left out); otherwise the
            registration order is used, which is the forward order for nn.Sequential-style
            models, and every module is assumed to be called once. A tensor is passed as
            ``model(x)``, a tuple as ``model(*args)``, a dict as ``model(**kwargs)``.
        unsupported: ``"fallback"`` or ``"error"`` for a weight matrix without a rule
            (:func:`weight_inventory`).

    Raises:
        NoTrackableLayerError: no trainable weight matrix.
        UnsupportedLayerError: a weight matrix without a rule, with ``unsupported="error"``.
        ValueError: a module configured so that no exact per-sample gradient exists
            (e.g. an Embedding with ``scale_grad_by_freq=True``), named.
    """
    return weight_inventory(model, unsupported, example_input)[0]


def operator_norms(model: nn.Module, dtype: Optional[torch.dtype] = None) -> list[float]:
    """σ1 of every tracked layer's weight matrix, in forward order.

    Args:
        model: any nn.Module with a tracked layer (:func:`tracked_layers`).
        dtype: the dtype of the SVD (e.g. ``torch.float64``); None: the weight's own.

    Returns:
        The largest singular value of each layer's :meth:`TrackedLayer.matrix`, once per
        layer (a tied weight's uses are not repeated; :func:`product_norm` counts them).
    """
    with torch.no_grad():
        return [float(torch.linalg.svdvals(l.matrix() if dtype is None else l.matrix().to(dtype))[0])
                for l in tracked_layers(model)]


def product_norm(model: nn.Module, dtype: Optional[torch.dtype] = None) -> float:
    """K = Π σ1^c over the tracked layers, c the uses of each weight (Prop 8–9), as the tracker counts it.

    Args:
        model: any nn.Module with a tracked layer.
        dtype: the dtype of the SVDs (:func:`operator_norms`); None: the weights' own.
    """
    uses = [l.uses for l in tracked_layers(model)]
    return math.exp(sum(c * math.log(s) for c, s in zip(uses, operator_norms(model, dtype))))
