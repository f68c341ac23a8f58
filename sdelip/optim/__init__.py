"""Optimizer rules: the update Δ = −lr·P each optimizer applies, and its model in the gradient.

One registry keyed by the optimizer's exact class (:func:`register_optimizer_rule`), one
module per family:

===========  ==========================================  ==================================
module       rule                                        optimizers
===========  ==========================================  ==================================
``sgd``      :class:`~sdelip.optim.sgd.SGDRule`          SGD (momentum, dampening, Nesterov,
                                                         weight decay, maximize)
``adam``     :class:`~sdelip.optim.adam.AdamRule`        Adam, AdamW (amsgrad, coupled or
                                                         decoupled decay, maximize)
``rmsprop``  :class:`~sdelip.optim.rmsprop.RMSpropRule`  RMSprop (centered, momentum, …)
``adagrad``  :class:`~sdelip.optim.adagrad.AdagradRule`  Adagrad (lr_decay, dense gradients)
===========  ==========================================  ==================================

See :mod:`sdelip.optim.base` for :class:`UpdateModel` (direction P, mean direction P̄,
noise scale S = ∂P/∂g, offset C, decoupled decay) and each module for its update map and
derivation.
"""

from .base import (
    NoOptimizerRuleError,
    OptimizerRule,
    UnsupportedOptimizerError,
    UpdateModel,
    optimizer_rule,
    register_optimizer_rule,
    registered_optimizer_rules,
    require_optimizer_rule,
    update_model,
)
from .adagrad import AdagradRule
from .adam import AdamRule
from .rmsprop import RMSpropRule
from .sgd import SGDRule

__all__ = [
    "NoOptimizerRuleError",
    "OptimizerRule",
    "UnsupportedOptimizerError",
    "UpdateModel",
    "optimizer_rule",
    "register_optimizer_rule",
    "registered_optimizer_rules",
    "require_optimizer_rule",
    "update_model",
    "SGDRule",
    "AdamRule",
    "RMSpropRule",
    "AdagradRule",
]
