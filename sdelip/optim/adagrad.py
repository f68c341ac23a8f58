"""torch.optim.Adagrad: lr_decay, weight decay, initial accumulator, eps, maximize.

Update map (torch/optim/adagrad.py, ``_single_tensor_adagrad``, dense gradients): with
s = −1 if ``maximize`` else 1, λ = ``weight_decay``, t = ``state["step"] + 1``, the
accumulator A = ``state["sum"]`` (initialised to ``initial_accumulator_value``):

* ĝ = s·g + λW,   A_t = A + ĝ²,   c_t = 1/(1 + (t − 1)·lr_decay),
* W ← W − lr·c_t·ĝ/(√A_t + ε).

So Δ = −lr·P exactly with P = c_t·ĝ/(√A_t + ε) (the lr decay is folded into P; ``lr`` stays
the group's lr, the clock's choice is the caller's).

The model: A_t held at its expectation over mini-batches, E[A_t] = A + ĝ² + Σ̂ (``noise_var``
= Σ̂), D = c_t/(√E[A_t] + ε); P̄ = D∘ĝ, S = s·D, C = D∘(λW), P̄ = C + S∘g. The neglected
dependence of A_t on g has relative order ĝ²/A_t: O(1) at t = 1 with a zero accumulator
(sign-like step), ~1/t afterwards.
"""

from __future__ import annotations

import torch

from .base import OptimizerRule, UpdateModel, hyperparameters, register_optimizer_rule, scalar

__all__ = ["AdagradRule"]


@register_optimizer_rule(torch.optim.Adagrad)
class AdagradRule(OptimizerRule):
    """Rule of torch.optim.Adagrad (module docstring)."""

    def _model(self, optimizer, group, state, param, grad, noise_var, where):
        lr = scalar(group["lr"], "lr", where)
        lr_decay = scalar(group["lr_decay"], "lr_decay", where)
        eps = scalar(group["eps"], "eps", where)
        wd = scalar(group["weight_decay"], "weight_decay", where)
        s = -1.0 if group["maximize"] else 1.0
        if len(state) == 0:  # Adagrad fills its state in __init__; an empty state means the defaults
            t, A = 1, torch.full_like(param, scalar(group["initial_accumulator_value"], "initial_accumulator_value",
                                                    where))
        else:
            t, A = int(round(float(state["step"]))) + 1, state["sum"]
        c = 1.0 / (1.0 + (t - 1) * lr_decay)
        decay = wd * param
        ghat = s * grad + decay if wd != 0 else s * grad
        sq = ghat * ghat
        P = c * ghat / ((A + sq).sqrt() + eps)
        EA = A + sq if noise_var is None else A + sq + noise_var
        D = c / (EA.sqrt() + eps)
        C = D * decay if wd != 0 else torch.zeros_like(param)
        S = s * D
        return UpdateModel(optimizer=type(optimizer).__name__, lr=lr, step=t, first_step=t == 1,
                           direction=P, mean_direction=C + S * grad, noise_scale=S, offset=C,
                           decoupled_decay=0.0, linear_in_grad=False, hyperparameters=hyperparameters(group))
