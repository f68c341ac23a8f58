"""torch.optim.SGD: momentum, dampening, Nesterov, weight decay, maximize.

Update map (torch/optim/sgd.py, ``_single_tensor_sgd``; the foreach and fused paths compute
the same): with ĝ = s·g + λW, s = −1 if ``maximize`` else 1, λ = ``weight_decay``, β =
``momentum``, d = ``dampening``,

* β = 0:                       P = ĝ;
* β > 0, first step (no buffer): b = ĝ (a copy: *no* dampening on the first step);
  later steps:                 b = β·b_prev + (1 − d)·ĝ;
  heavy ball:                  P = b;
  Nesterov:                    P = ĝ + β·b;
* the step is W ← W − lr·P, so Δ = −lr·P exactly.

P is affine in g, P = C + S·g, with S = ∂P/∂g a scalar:

=====================  ===========================  ===========================================
case                   S                            C
=====================  ===========================  ===========================================
β = 0                  s                            λW
heavy ball, first      s                            λW
heavy ball             s(1 − d)                     β·b_prev + (1 − d)λW
Nesterov, first        s(1 + β)                     (1 + β)λW
Nesterov               s(1 + β(1 − d))              β²·b_prev + (1 + β(1 − d))λW
=====================  ===========================  ===========================================

(Nesterov: ĝ + β(β b_prev + (1 − d)ĝ) = β² b_prev + (1 + β(1 − d))ĝ.) Being affine, the
model is exact: the mean over mini-batches of P is C + S·ḡ and its covariance S²Σ, so
``mean_direction = direction`` and ``linear_in_grad = True``.

Caution for callers reading ``.grad`` after the step: the foreach path with Nesterov adds
β·b to the gradients *in place* (``torch._foreach_add_(grads, bufs, alpha=momentum)``), so
after ``step()`` the parameter's ``.grad`` holds P, not g (checked on torch 2.14). Read g
before the step.
"""

from __future__ import annotations

import torch

from .base import OptimizerRule, UpdateModel, hyperparameters, register_optimizer_rule, scalar

__all__ = ["SGDRule"]


@register_optimizer_rule(torch.optim.SGD)
class SGDRule(OptimizerRule):
    """Rule of torch.optim.SGD (module docstring)."""

    elementwise_noise_scale = False

    def _model(self, optimizer, group, state, param, grad, noise_var, where):
        lr = scalar(group["lr"], "lr", where)
        beta = scalar(group["momentum"], "momentum", where)
        damp = scalar(group["dampening"], "dampening", where)
        wd = scalar(group["weight_decay"], "weight_decay", where)
        nesterov = bool(group["nesterov"])
        s = -1.0 if group["maximize"] else 1.0
        decay = wd * param  # λW
        buf = state.get("momentum_buffer") if beta != 0 else None
        first = beta != 0 and buf is None
        if beta == 0:
            S, C = s, decay
        elif first:
            S = s * (1.0 + beta) if nesterov else s
            C = (1.0 + beta) * decay if nesterov else decay
        elif nesterov:
            k = 1.0 + beta * (1.0 - damp)
            S, C = s * k, beta * beta * buf + k * decay
        else:
            S, C = s * (1.0 - damp), beta * buf + (1.0 - damp) * decay
        P = C + S * grad
        return UpdateModel(optimizer=type(optimizer).__name__, lr=lr, step=None, first_step=first,
                           direction=P, mean_direction=P, noise_scale=float(S), offset=C,
                           decoupled_decay=0.0, linear_in_grad=True, hyperparameters=hyperparameters(group))
