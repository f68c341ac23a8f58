"""Optimizer rules: the update an optimizer applies to one parameter, written Δ = −lr·P.

A rule reads, *before* ``optimizer.step()``, the optimizer's state for one parameter, the
hyper-parameters of its param group and the gradient g the step will use (by default the
parameter's ``.grad``), and returns an :class:`UpdateModel`:

* ``direction`` P, the exact direction: the step moves the parameter by Δ = −lr·P (decoupled
  weight decay folded in as λ·W, so the identity holds exactly);
* ``mean_direction`` P̄ and ``noise_scale`` S = ∂P/∂g: the model of the update as a function
  of the gradient, P(ḡ + ξ) ≈ P̄ + S∘ξ, with every quantity that is not linear in g (Adam's
  second moment, RMSprop's square average) held at its expectation over mini-batches
  (``noise_var``, the variance of the mini-batch gradient, enters there);
* ``offset`` C with P̄ = C + S∘g: the part of the drift carried by the state (momentum
  buffers, weight decay), so that u1ᵀP̄v1 = u1ᵀCv1 + ⟨S∘u1v1ᵀ, g⟩ splits into a known matrix
  and a contraction with the gradient.

One registry keyed by the optimizer's *exact* class (:func:`register_optimizer_rule`):
a subclass of a registered optimizer may override ``step()``, so it never inherits a rule
silently; register it explicitly if its update map is the same. :func:`optimizer_rule`
returns None for an optimizer without a rule, :func:`require_optimizer_rule` raises
:class:`NoOptimizerRuleError` naming the supported classes.
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, Optional, Union

import attrs
import torch

from ..errors import NoOptimizerRuleError, UnsupportedOptimizerError  # noqa: F401  (defined there, re-exported)

__all__ = [
    "UpdateModel",
    "OptimizerRule",
    "register_optimizer_rule",
    "optimizer_rule",
    "require_optimizer_rule",
    "registered_optimizer_rules",
    "update_model",
    "NoOptimizerRuleError",
    "UnsupportedOptimizerError",
]






@attrs.frozen
class UpdateModel:
    """One optimizer step on one parameter, Δ = −lr·P, and its linear model in the gradient.

    Attributes:
        optimizer: the optimizer's class name.
        lr: the param group's learning rate at this step, a float (a tensor lr is read with
            ``float``). Δ = −lr·P exactly; the caller chooses its clock from it (Σ lr for SGD).
        step: the index t ≥ 1 this step will have in the optimizer's own counter
            (``state["step"] + 1``), None for optimizers without one (SGD).
        first_step: whether the optimizer's state for this parameter is still empty/zero
            (SGD's momentum buffer is created from g, Adam's t = 1, …).
        direction: P (parameter shape), exact for the gradient given: Δ = −lr·P.
        mean_direction: P̄ (parameter shape), P with the non-linear state (second moments)
            held at its expectation over mini-batches. Equals ``direction`` for the SGD
            family, and for the adaptive rules when ``noise_var`` is None (the expectation
            is then the realised second moment of g).
        noise_scale: S = ∂P/∂g at the model's state, a float for the SGD family, a tensor of
            the parameter's shape for the adaptive rules; the noise ξ of the gradient moves
            the parameter by −lr·S∘ξ.
        offset: C (parameter shape) with P̄ = C + S∘g exactly (g the gradient given).
        decoupled_decay: λ with λ·W folded into P (AdamW's ``param.mul_(1 − lr·λ)``); 0 when
            the optimizer has no decoupled decay. The drift this contributes to σ1 is
            −lr·λ·σ1 (u1ᵀWv1 = σ1).
        linear_in_grad: True when P is exactly affine in g (SGD family: P = C + S·g for
            every g), False when S is a linearisation (adaptive rules).
        hyperparameters: the param group's hyper-parameters read (everything but ``params``).
    """

    optimizer: str
    lr: float
    step: Optional[int]
    first_step: bool
    direction: torch.Tensor = attrs.field(repr=False, eq=False)
    mean_direction: torch.Tensor = attrs.field(repr=False, eq=False)
    noise_scale: Union[float, torch.Tensor] = attrs.field(repr=False, eq=False)
    offset: torch.Tensor = attrs.field(repr=False, eq=False)
    decoupled_decay: float = 0.0
    linear_in_grad: bool = True
    hyperparameters: dict = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def update(self) -> torch.Tensor:
        """Δ = −lr·P, the change of the parameter the step applies."""
        return -self.lr * self.direction

    @property
    def mean_update(self) -> torch.Tensor:
        """−lr·P̄, the model's mean change over mini-batches."""
        return -self.lr * self.mean_direction


class OptimizerRule(abc.ABC):
    """The update map of one optimizer family (see the module docstring)."""

    #: the optimizer classes this rule is registered for (set by the decorator)
    optimizer_types: ClassVar[tuple] = ()
    #: whether the noise scale S = ∂P/∂g is elementwise (a tensor) rather than one scalar
    elementwise_noise_scale: ClassVar[bool] = True

    @abc.abstractmethod
    def _model(self, optimizer: torch.optim.Optimizer, group: dict, state: dict, param: torch.Tensor,
               grad: torch.Tensor, noise_var: Optional[torch.Tensor], where: str) -> UpdateModel:
        """The model for one parameter (inputs checked by :meth:`model`)."""

    def model(self, optimizer: torch.optim.Optimizer, param: torch.Tensor, grad: Optional[torch.Tensor] = None,
              *, noise_var: Optional[torch.Tensor] = None, name: Optional[str] = None) -> UpdateModel:
        """The :class:`UpdateModel` of the next ``optimizer.step()`` for ``param``.

        Args:
            optimizer: the optimizer, *before* its step (nothing is modified).
            param: a parameter of one of its param groups.
            grad: the gradient the step will use, parameter shape; default ``param.grad``.
            noise_var: the variance of the mini-batch gradient (diag Σ̂), parameter shape, or
                None (zero); used only where a rule holds a second moment at its expectation.
            name: the parameter's name, for messages.

        Raises:
            UnsupportedOptimizerError: the parameter is not in the optimizer, has no gradient, is
                complex, has a sparse gradient, or the optimizer steps through a GradScaler's
                fused unscaling (``optimizer.grad_scale``) — the message names which.
        """
        where = f"{type(optimizer).__name__} parameter {name or tuple(param.shape)}"
        group = _group_of(optimizer, param, where)
        if grad is None:
            grad = param.grad
        if grad is None:
            raise UnsupportedOptimizerError(f"{where}: no gradient (param.grad is None and none was given); "
                                            "the optimizer would skip this parameter")
        if grad.is_sparse:
            raise UnsupportedOptimizerError(f"{where}: sparse gradients are not modelled")
        if torch.is_complex(param) or torch.is_complex(grad):
            raise UnsupportedOptimizerError(f"{where}: complex parameters are not modelled")
        if grad.shape != param.shape:
            raise UnsupportedOptimizerError(f"{where}: gradient shape {tuple(grad.shape)} is not the parameter's "
                                            f"{tuple(param.shape)}")
        if noise_var is not None and noise_var.shape != param.shape:
            raise UnsupportedOptimizerError(f"{where}: noise_var shape {tuple(noise_var.shape)} is not the "
                                            f"parameter's {tuple(param.shape)}")
        if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
            raise UnsupportedOptimizerError(f"{where}: the optimizer carries a GradScaler's grad_scale/found_inf "
                                            "(fused unscaling inside step()); the gradient it steps with is not g")
        if group.get("differentiable", False):
            raise UnsupportedOptimizerError(f"{where}: differentiable=True is not modelled")
        state = optimizer.state.get(param, {})
        with torch.no_grad():
            return self._model(optimizer, group, state, param.detach(), grad.detach(),
                               None if noise_var is None else noise_var.detach(), where)


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: str) -> dict:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is param:
                return group
    raise UnsupportedOptimizerError(f"{where}: the tensor is not a parameter of any of the optimizer's "
                                    f"{len(optimizer.param_groups)} param groups")


def scalar(x, what: str, where: str) -> float:
    """A hyper-parameter as a Python float (a one-element tensor lr or beta is read)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise UnsupportedOptimizerError(f"{where}: hyper-parameter {what} is a tensor of {x.numel()} elements")
        return float(x.detach().reshape(()).item())
    return float(x)


def hyperparameters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


_REGISTRY: dict[type, OptimizerRule] = {}


def register_optimizer_rule(*optimizer_types: type) -> Callable[[type], type]:
    """Class decorator: register an :class:`OptimizerRule` for exactly these optimizer classes.

    Subclasses of a registered class are *not* covered (they may change ``step()``);
    register them explicitly.
    """
    if not optimizer_types or not all(isinstance(t, type) and issubclass(t, torch.optim.Optimizer)
                                      for t in optimizer_types):
        raise TypeError(f"register_optimizer_rule needs torch.optim.Optimizer subclasses, got {optimizer_types!r}")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, OptimizerRule)):
            raise TypeError(f"register_optimizer_rule decorates OptimizerRule subclasses, got {cls!r}")
        cls.optimizer_types = tuple(cls.optimizer_types) + tuple(t for t in optimizer_types
                                                                 if t not in cls.optimizer_types)
        rule = cls()
        for t in optimizer_types:
            _REGISTRY[t] = rule
        return cls

    return deco


def optimizer_rule(optimizer) -> Optional[OptimizerRule]:
    """The rule registered for the exact class of ``optimizer`` (an instance or a class), or None."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    return _REGISTRY.get(cls)


def registered_optimizer_rules() -> dict[type, OptimizerRule]:
    """Optimizer class → rule, for every registered rule."""
    return dict(_REGISTRY)


def _supported() -> str:
    return ", ".join(sorted(f"{t.__module__}.{t.__qualname__}" for t in _REGISTRY))


def require_optimizer_rule(optimizer) -> OptimizerRule:
    """Like :func:`optimizer_rule` but raises :class:`NoOptimizerRuleError` naming the supported classes."""
    rule = optimizer_rule(optimizer)
    if rule is None:
        cls = optimizer if isinstance(optimizer, type) else type(optimizer)
        bases = [t.__qualname__ for t in cls.__mro__[1:] if t in _REGISTRY]
        hint = (f" (it subclasses {', '.join(bases)}, whose rule is not inherited because a subclass may "
                "change step(); register it with register_optimizer_rule if its update is the same)") if bases else ""
        raise NoOptimizerRuleError(f"no optimizer rule for {cls.__module__}.{cls.__qualname__}{hint}; "
                                   f"supported: {_supported()}")
    return rule


def update_model(optimizer: torch.optim.Optimizer, param: torch.Tensor, grad: Optional[torch.Tensor] = None, *,
                 noise_var: Optional[torch.Tensor] = None, name: Optional[str] = None) -> UpdateModel:
    """``require_optimizer_rule(optimizer).model(optimizer, param, grad, ...)``."""
    return require_optimizer_rule(optimizer).model(optimizer, param, grad, noise_var=noise_var, name=name)
