"""torch.optim.Adam and torch.optim.AdamW (coupled or decoupled weight decay, amsgrad, maximize).

Update map (torch/optim/adam.py, ``_single_tensor_adam``; the foreach, fused and capturable
paths compute the same maths): with s = −1 if ``maximize`` else 1, λ = ``weight_decay``,
t = ``state["step"] + 1`` (t = 1 on an empty state, m = v = v_max = 0), β1, β2 = ``betas``,

* coupled decay (Adam, ``decoupled_weight_decay=False``):   ĝ = s·g + λW, λ_d = 0;
  decoupled decay (AdamW, or Adam with ``decoupled_weight_decay=True``): ĝ = s·g, λ_d = λ,
  applied first as W ← (1 − lr·λ)W;
* m_t = β1·m + (1 − β1)ĝ,   v_t = β2·v + (1 − β2)ĝ²,   (amsgrad: v_t ← max(v_max, v_t));
* b1 = 1 − β1ᵗ, b2 = 1 − β2ᵗ, W ← W − (lr/b1)·m_t / (√v_t/√b2 + ε).

Hence Δ = −lr·P exactly with

    P = λ_d·W + m_t / (b1·(√v̂_t + ε)),   v̂_t = v_t/b2   (ε outside the square root).

The model in the gradient. P depends on g through m_t (linearly) and v_t (not). Holding
the second moment at its expectation over mini-batches — E[ĝ_b²] = ĝ² + diag Σ̂ when g is
the mean gradient and ``noise_var`` = diag Σ̂ the mini-batch gradient's variance —

    v_noise = β2·v + (1 − β2)(ĝ² + noise_var)      (amsgrad: max(v_max, v_noise)),
    D = 1 / (√(v_noise/b2) + ε),
    P̄ = λ_d·W + D∘(β1·m + (1 − β1)ĝ)/b1,
    S = ∂P/∂g = s·(1 − β1)/b1 · D,               (coupled decay enters ĝ, not S)
    C = λ_d·W + D∘(β1·m + (1 − β1)λ_c·W)/b1,      P̄ = C + S∘g,

λ_c = λ for coupled decay, else 0. With ``noise_var=None``, v_noise = v_t and P̄ = P.

Where the linearisation fails. The neglected term is ∂P/∂v̂ · ∂v̂/∂g = −½ m̂ D²/√v̂ ·
(1 − β2)/b2 · 2ĝ: relative to the kept one it is of order (1 − β2)ĝ²/(b2·v̂), which is 1 at
t = 1 (v̂_1 = ĝ², P = ĝ/(|ĝ| + ε) ≈ sign ĝ: a sign-like step, not linear in the noise at all)
and decays like 1/t while t ≪ 1/(1 − β2) (b2 ≈ t(1 − β2)). Over the first tens of steps the
mean and covariance of Δ therefore deviate from P̄ and S Σ S at O(ξ²) (third-order terms of the
expansion); the model is accurate once the current batch's share of v̂ is small. Using the
*realised* v_t of one batch for S (instead of its expectation) makes D = 1/|ĝ_b| wherever the
per-sample gradients cancel, which is why the expectation is used.
"""

from __future__ import annotations

import torch

from .base import (OptimizerRule, UnsupportedOptimizerError, UpdateModel, hyperparameters,
                   register_optimizer_rule, scalar)

__all__ = ["AdamRule"]


@register_optimizer_rule(torch.optim.Adam, torch.optim.AdamW)
class AdamRule(OptimizerRule):
    """Rule of torch.optim.Adam and AdamW (module docstring)."""

    def _model(self, optimizer, group, state, param, grad, noise_var, where):
        lr = scalar(group["lr"], "lr", where)
        beta1, beta2 = (scalar(b, name, where) for b, name in zip(group["betas"], ("beta1", "beta2")))
        eps = scalar(group["eps"], "eps", where)
        wd = scalar(group["weight_decay"], "weight_decay", where)
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        amsgrad = bool(group["amsgrad"])
        s = -1.0 if group["maximize"] else 1.0
        if len(state) == 0:
            t = 1
            m = v = vmax = torch.zeros_like(param)
        else:
            t = int(round(float(state["step"]))) + 1
            m, v = state["exp_avg"], state["exp_avg_sq"]
            vmax = state.get("max_exp_avg_sq") if amsgrad else None
            if amsgrad and vmax is None:
                raise UnsupportedOptimizerError(f"{where}: amsgrad=True but the state has no max_exp_avg_sq "
                                                "(amsgrad switched on after the first step)")
        lam_c = 0.0 if decoupled else wd
        lam_d = wd if decoupled else 0.0
        ghat = s * grad + lam_c * param if lam_c != 0 else s * grad
        b1 = 1.0 - beta1**t
        b2 = 1.0 - beta2**t
        m_t = beta1 * m + (1.0 - beta1) * ghat
        sq = ghat * ghat
        v_t = beta2 * v + (1.0 - beta2) * sq
        v_noise = v_t if noise_var is None else beta2 * v + (1.0 - beta2) * (sq + noise_var)
        if amsgrad:
            v_t = torch.maximum(vmax, v_t)
            v_noise = torch.maximum(vmax, v_noise)
        sqrt_b2 = b2**0.5
        P = m_t / (b1 * (v_t.sqrt() / sqrt_b2 + eps))
        D = 1.0 / (v_noise.sqrt() / sqrt_b2 + eps)
        mem = beta1 * m
        C = D * (mem + (1.0 - beta1) * lam_c * param) / b1 if lam_c != 0 else D * mem / b1
        S = (s * (1.0 - beta1) / b1) * D
        if lam_d != 0:
            P = P + lam_d * param
            C = C + lam_d * param
        P_bar = C + S * grad
        return UpdateModel(optimizer=type(optimizer).__name__, lr=lr, step=t, first_step=t == 1,
                           direction=P, mean_direction=P_bar, noise_scale=S, offset=C,
                           decoupled_decay=lam_d, linear_in_grad=False, hyperparameters=hyperparameters(group))
