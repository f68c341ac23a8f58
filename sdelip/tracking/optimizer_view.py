"""What the tracker reads from the optimizer: η, the update rule of each tracked weight, the step hooks.

The update of an optimizer is written Δ = −η·P(ḡ + ξ; state) (docs/theory.md §15): P is the
direction it applies at the mini-batch gradient, S = ∂P/∂g maps the mini-batch noise ξ.
:class:`OptimizerView` maps every tracked weight to its param group, reads η (one η for
all tracked layers: the SDE time is t = Σ η), asks the optimizer's rule in
:mod:`sdelip.optim` for P and S (:meth:`OptimizerView.layer_update`; plain SGD, P = ḡ + λθ,
S = 1, keeps the plain formulas), and installs the step hooks through which the tracker
finishes a step's row at ``optimizer.step()``. An optimizer without a rule gets a
:class:`NotPlainSGDWarning` and no model coefficients. It also counts the tracker's
backward passes between ``optimizer.step()`` calls, so that gradient accumulation is
refused instead of counting each micro-batch as a step.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Union

import attrs

import numpy as np
import torch

from ..errors import NotPlainSGDWarning  # noqa: F401  (defined there, re-exported)

__all__ = ["OptimizerView", "NotPlainSGDWarning", "LayerUpdate"]


@attrs.frozen
class LayerUpdate:
    """One tracked layer's update model at a step, as weight matrices (docs/theory.md §15).

    Attributes:
        direction: P (m, n), the update at the step's gradient: Δ = −η·P.
        noise_scale: S = ∂P/∂g, a float (the SGD family) or an (m, n) matrix (adaptive methods).
    """

    direction: torch.Tensor
    noise_scale: Union[float, torch.Tensor]


class OptimizerView:
    """The optimizer as the tracker sees it: η, its update rule, and its step hooks.

    Args:
        optimizer: the optimizer stepping the model, or None (then the update is taken to
            be plain SGD with η = ``lr``).
        layers: the tracked layers.
        lr: the learning rate when ``optimizer`` is None.

    Raises:
        ValueError: no optimizer and no ``lr``; a tracked weight that the optimizer does
            not train (named).
    """

    def __init__(self, optimizer: Optional[torch.optim.Optimizer], layers: Sequence, lr: Optional[float] = None):
        self.optimizer = optimizer
        self.layers = list(layers)
        self.lr_override = None if lr is None else float(lr)
        self.groups = self._map_param_groups()
        self.backwards_since_step = 0
        self.rule = None
        if optimizer is not None:
            from ..optim import optimizer_rule

            self.rule = optimizer_rule(optimizer)

    def _map_param_groups(self) -> dict[str, int]:
        groups = {}
        if self.optimizer is None:
            if self.lr_override is None:
                raise ValueError("without an optimizer the tracker needs the learning rate: Tracker(model, None, lr=...)")
            return groups
        where = {}
        for gi, g in enumerate(self.optimizer.param_groups):
            for p in g["params"]:
                where[id(p)] = gi
        for layer in self.layers:
            gi = where.get(id(layer.weight))
            if gi is None:
                raise ValueError(
                    f"the weight of layer {layer.name!r} is not optimised by the optimizer: the tracked layers "
                    "must be trained by the optimizer whose learning rate η sets the SDE time"
                )
            groups[layer.name] = gi
        return groups

    @property
    def observed(self) -> bool:
        """Whether the optimizer's steps are observed (step hooks): rows are finished at ``optimizer.step()``."""
        return self.optimizer is not None and hasattr(self.optimizer, "register_step_pre_hook")

    @property
    def modelled(self) -> bool:
        """Whether the model coefficients of an update are computed (no optimizer: plain SGD; else a rule)."""
        return self.optimizer is None or self.rule is not None

    @property
    def rule_name(self) -> Optional[str]:
        if self.optimizer is None:
            return "plain SGD (no optimizer given)"
        return None if self.rule is None else type(self.optimizer).__name__

    def warn(self, stacklevel: int = 3) -> None:
        """:class:`NotPlainSGDWarning` for an optimizer without an update rule (named, with the supported ones)."""
        if self.optimizer is None or self.rule is not None:
            return
        from ..optim import registered_optimizer_rules

        warnings.warn(
            f"the optimizer {type(self.optimizer).__module__}.{type(self.optimizer).__qualname__} has no update rule "
            f"in sdelip.optim (rules: {', '.join(sorted(c.__name__ for c in registered_optimizer_rules()))}): the record holds σ1, the gap and the "
            "realised increments of every update, but no model coefficients (μ, κ, ‖λ‖² are NaN), and predict and "
            "the reduced SDE refuse it",
            NotPlainSGDWarning,
            stacklevel=stacklevel + 1,
        )

    def hyperparameters(self, step: int) -> tuple[float, dict[str, float]]:
        """η and the per-layer (coupled, SGD) weight decay in effect for update ``step``."""
        if self.optimizer is None:
            return self.lr_override, {l.name: 0.0 for l in self.layers}
        lrs, wds = {}, {}
        sgd = isinstance(self.optimizer, torch.optim.SGD)
        for layer in self.layers:
            g = self.optimizer.param_groups[self.groups[layer.name]]
            lr = g["lr"]
            lrs[layer.name] = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
            wds[layer.name] = float(g.get("weight_decay", 0.0)) if sgd else 0.0
        values = set(lrs.values())
        if len(values) > 1:
            raise ValueError(
                f"step {step}: the tracked layers have different learning rates {lrs}; the SDE time t = Σ η "
                "(docs/theory.md §1) needs one η for all tracked layers"
            )
        lr = values.pop()
        if not (lr > 0 and np.isfinite(lr)):
            raise ValueError(f"step {step}: the learning rate must be positive and finite, got {lr!r}")
        return lr, wds

    # -- the update model ------------------------------------------------------------------------
    def is_plain(self, layer) -> bool:
        """Plain SGD for this layer's group: P = g + λθ, S = 1 (no momentum, not maximising)."""
        if self.optimizer is None:
            return True
        if type(self.optimizer) is not torch.optim.SGD:
            return False
        g = self.optimizer.param_groups[self.groups[layer.name]]
        return not g.get("momentum", 0) and not g.get("maximize", False)

    @property
    def elementwise(self) -> bool:
        """Whether the rule's noise scale S is elementwise (adaptive methods): the engine must apply it."""
        return self.rule is not None and bool(self.rule.elementwise_noise_scale)

    def layer_update(self, layer, grad: torch.Tensor, noise_var: Optional[torch.Tensor] = None,
                     grad_scale: float = 1.0) -> LayerUpdate:
        """The layer's :class:`LayerUpdate` for the gradient ``grad`` (parameter shape) the step uses.

        ``noise_var``: diag Σ̂ of the mini-batch gradient (parameter shape), which adaptive
        methods' noise scale needs; ``grad_scale``: c when the step's gradient is c times
        the tracked one (the per-sample noise is then c·ξ_i).
        """
        p = layer.weight
        if self.is_plain(layer):
            g = self.optimizer.param_groups[self.groups[layer.name]] if self.optimizer is not None else {}
            P = grad + float(g.get("weight_decay", 0.0)) * p.detach()
            return LayerUpdate(layer.rule.matrix(P), float(grad_scale))
        model = self.rule.model(self.optimizer, p, grad, noise_var=noise_var, name=layer.parameter_name)
        S = model.noise_scale
        if isinstance(S, torch.Tensor):
            S = layer.rule.matrix(S * grad_scale)
        else:
            S = float(S) * grad_scale
        return LayerUpdate(layer.rule.matrix(model.direction), S)

    def noise_scale_fn(self) -> Callable:
        """The engines' ``scale(name, mean_grad, noise_var)`` hook: the rule's elementwise S as a matrix."""
        by_name = {l.name: l for l in self.layers}

        def scale(name, mean_grad, noise_var):
            layer = by_name[name]
            shape = layer.weight.shape
            g = mean_grad.reshape(shape).to(layer.weight.dtype)
            nv = None if noise_var is None else noise_var.reshape(shape).to(layer.weight.dtype)
            S = self.rule.model(self.optimizer, layer.weight, g, noise_var=nv, name=layer.parameter_name).noise_scale
            return layer.rule.matrix(S).to(mean_grad.dtype)

        return scale

    def metadata(self) -> Optional[dict]:
        """The optimizer's class, rule, clock and param-group hyper-parameters, for the record."""
        opt = self.optimizer
        if opt is None:
            return None
        return {
            "class": type(opt).__name__,
            "rule": self.rule_name,
            "clock": "t = Σ_k η_k (the learning rate of each update; docs/theory.md §15)",
            "param_groups": [
                {k: (v if isinstance(v, (int, float, bool, str, type(None))) else repr(v))
                 for k, v in g.items() if k != "params"}
                for g in opt.param_groups
            ],
        }

    def attach(self, before_step: Optional[Callable] = None, after_step: Optional[Callable] = None) -> list:
        """Step hooks: ``before_step()`` before and ``after_step()`` after every ``optimizer.step()``."""
        if self.optimizer is None or not hasattr(self.optimizer, "register_step_post_hook"):
            return []

        def post(*args):
            self.backwards_since_step = 0
            if after_step is not None:
                after_step()

        handles = [self.optimizer.register_step_post_hook(post)]
        if before_step is not None:
            handles.append(self.optimizer.register_step_pre_hook(lambda *args: before_step()))
        return handles
