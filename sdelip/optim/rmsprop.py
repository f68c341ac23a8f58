"""torch.optim.RMSprop: alpha, eps, weight decay, momentum, centered, maximize.

Update map (torch/optim/rmsprop.py, ``_single_tensor_rmsprop``; foreach computes the same):
with s = −1 if ``maximize`` else 1, λ = ``weight_decay``, α = ``alpha``, μ = ``momentum``, the
state (zeros on the first step) a = ``square_avg``, ḡa = ``grad_avg`` (centered), b =
``momentum_buffer`` (μ > 0):

* ĝ = s·g + λW;   a_t = α·a + (1 − α)ĝ²;
* centered: ḡa_t = α·ḡa + (1 − α)ĝ,  r_t = √(a_t − ḡa_t²) + ε;   else r_t = √a_t + ε;
* μ = 0: W ← W − lr·ĝ/r_t;   μ > 0: b_t = μ·b + ĝ/r_t,  W ← W − lr·b_t.

So Δ = −lr·P exactly with P = ĝ/r_t (μ = 0) or P = μ·b + ĝ/r_t (μ > 0); there is no bias
correction and no decoupled decay.

The model in the gradient (derivation as for Adam, :mod:`sdelip.optim.adam`): r is held at
the expectation over mini-batches of the quantity under its square root, for a mean
gradient g and a mini-batch variance ``noise_var`` = diag Σ̂ (ĝ_b = ĝ + s·ξ, Var ĝ_b = Σ̂):

    E[a_t]      = α·a + (1 − α)(ĝ² + Σ̂),
    E[ḡa_t²]    = (α·ḡa + (1 − α)ĝ)² + (1 − α)²·Σ̂                 (centered),
    D = 1 / (√(E[a_t] − E[ḡa_t²]) + ε)   (centered; the radicand is ≥ 0 and clamped at 0
                                          against rounding),   D = 1/(√E[a_t] + ε)  otherwise,
    P̄ = μ·b + D∘ĝ,   S = ∂P/∂g = s·D,   C = μ·b + D∘(λW),   P̄ = C + S∘g.

(The momentum buffer is part of the known state, so momentum changes C, not S.) With
``noise_var=None`` the expectation is the realised value and P̄ = P. As for Adam the neglected
dependence of r on g is of relative order (1 − α)ĝ²/a_t: O(1) on the first steps (t = 1:
P = ĝ/(√(1 − α)|ĝ| + ε), sign-like), and (1 − α) once a_t has forgotten its zero start.
"""

from __future__ import annotations

import torch

from .base import OptimizerRule, UpdateModel, hyperparameters, register_optimizer_rule, scalar

__all__ = ["RMSpropRule"]


@register_optimizer_rule(torch.optim.RMSprop)
class RMSpropRule(OptimizerRule):
    """Rule of torch.optim.RMSprop (module docstring)."""

    def _model(self, optimizer, group, state, param, grad, noise_var, where):
        lr = scalar(group["lr"], "lr", where)
        alpha = scalar(group["alpha"], "alpha", where)
        eps = scalar(group["eps"], "eps", where)
        wd = scalar(group["weight_decay"], "weight_decay", where)
        mu = scalar(group["momentum"], "momentum", where)
        centered = bool(group["centered"])
        s = -1.0 if group["maximize"] else 1.0
        zeros = torch.zeros_like(param)
        empty = len(state) == 0
        t = 1 if empty else int(round(float(state["step"]))) + 1
        a = zeros if empty else state["square_avg"]
        ga = (zeros if empty else state["grad_avg"]) if centered else None
        buf = (zeros if empty else state["momentum_buffer"]) if mu > 0 else None
        decay = wd * param
        ghat = s * grad + decay if wd != 0 else s * grad
        sq = ghat * ghat
        a_t = alpha * a + (1.0 - alpha) * sq
        if centered:
            ga_mean = alpha * ga + (1.0 - alpha) * ghat
            r = (a_t - ga_mean * ga_mean).sqrt() + eps
        else:
            r = a_t.sqrt() + eps
        if noise_var is None:
            D = 1.0 / r
        else:
            ea = alpha * a + (1.0 - alpha) * (sq + noise_var)
            if centered:
                rad = (ea - ga_mean * ga_mean - (1.0 - alpha) ** 2 * noise_var).clamp(min=0.0)
            else:
                rad = ea
            D = 1.0 / (rad.sqrt() + eps)
        P = ghat / r
        C = D * decay if wd != 0 else zeros
        if mu > 0:
            P = mu * buf + P
            C = mu * buf + C
        S = s * D
        P_bar = C + S * grad
        return UpdateModel(optimizer=type(optimizer).__name__, lr=lr, step=t, first_step=t == 1,
                           direction=P, mean_direction=P_bar, noise_scale=S, offset=C,
                           decoupled_decay=0.0, linear_in_grad=False, hyperparameters=hyperparameters(group))
