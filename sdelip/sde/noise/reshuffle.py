"""The parameter SDE of SGD with reshuffled epochs: drift and noise from one weighted pass over the data.

Reshuffled SGD (a permutation per epoch, mini-batches of M samples without replacement
within it) has, at fixed θ, the mini-batch noise ξ_j = ḡ_{B_j} − ∇L of step j with
(docs/theory.md §10; Σ_N = (1/N) Σ_i d_i d_iᵀ, d_i = g_i − ∇L over all
N samples)

    Cov ξ_j = (1/M) (N − M)/(N − 1) Σ_N,   Cov(ξ_j, ξ_k) = −Σ_N/(N − 1)  (j ≠ k, same epoch),

independent across epochs, and Σ_j ξ_j = 0 over an epoch when S·M = N. With the
dataset-level factor

    G(θ) = D(θ)/√(M(N − 1)),   D = [d_1, …, d_N]   (P × N),

driven by the N-dimensional :class:`~sdelip.sde.EpochBrownian` W (Cov of one epoch's
increments dt(δ_jk − M/N) per coordinate), one Euler step of length dt = η has exactly
those second moments: η G Cov(ΔW_j, ΔW_k) Gᵀ/dt = η² Σ_N N(δ_jk − M/N)/(M(N − 1)).

The increment is a weighted gradient: with c_i = √η ΔW_i/√(M(N − 1)),

    √η G ΔW = Σ_i c_i (g_i − ∇L) = ∇_θ Σ_i (c_i − c̄) ℓ_i,

and the drift −∇L = −∇_θ Σ_i ℓ_i/N runs over the same N samples. :class:`ReshufflePass`
evaluates both for a chunk of trajectories with one forward pass of the data and one
backward pass with two cotangents (1/N and c − c̄): no per-sample gradient is formed,
and the drift costs nothing beyond the noise.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

__all__ = ["ReshufflePass", "reshuffle_moments"]


def reshuffle_moments(N: int, M: int) -> dict:
    """Second moments of reshuffled mini-batch noise at fixed θ, in units of Σ_N = Var_N[g].

    Returns ``{"step": (N − M)/(M(N − 1)), "cross": −1/(N − 1), "steps_per_epoch": ⌊N/M⌋,
    "epoch_sum": Var of Σ_j ξ_j over an epoch}``: Cov ξ_j = step·Σ_N, Cov(ξ_j, ξ_k) = cross·Σ_N.
    """
    N, M = int(N), int(M)
    if not 1 <= M <= N or N < 2:
        raise ValueError(f"need 1 <= M <= N and N >= 2, got N = {N}, M = {M}")
    S = N // M
    step, cross = (N - M) / (M * (N - 1)), -1.0 / (N - 1)
    return {"step": step, "cross": cross, "steps_per_epoch": S, "epoch_sum": S * step + S * (S - 1) * cross}


class ReshufflePass:
    """Expected gradient and weighted gradient Σ_i w_i g_i over the whole data, batched over trajectories.

    Args:
        model: the network (evaluated functionally; never modified).
        loss_fn: ``loss_fn(output, target)`` returning the mean loss of a batch; the
            per-sample loss ℓ_i is its value on the one-sample batch.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable):
        self.model = model
        self.loss_fn = loss_fn

    def __call__(
        self,
        params: Dict[str, torch.Tensor],
        consts: Dict[str, torch.Tensor],
        X: torch.Tensor,
        Y: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        drift: bool = True,
        traj_chunk: Optional[int] = None,
        rows: int = 4096,
    ):
        """(∇L, Σ_i w_i g_i) at every trajectory's parameters.

        Args:
            params: {name: (n, *shape)}.
            consts: frozen parameters and buffers.
            X, Y: the whole training set (N, …).
            weights: (n, N) per-sample weights of the increment, or None.
            drift: also return the mean gradient (1/N) Σ_i g_i.
            traj_chunk: trajectories per batched call (None: all).
            rows: samples per batched call.

        Returns:
            (grad or None, increment or None): {name: (n, *shape)} each.
        """
        if not drift and weights is None:
            return None, None
        model, loss_fn = self.model, self.loss_fn
        N = X.shape[0]
        n = next(iter(params.values())).shape[0]
        if weights is not None and tuple(weights.shape) != (n, N):
            raise ValueError(f"weights must have shape (trajectories, samples) = {(n, N)}, got {tuple(weights.shape)}")

        def one(p, x, y, w):
            def losses(q):
                out = functional_call(model, {**consts, **q}, (x,))
                return vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)

            ls, pull = vjp(losses, p)
            cots = []
            if drift:
                cots.append(torch.full_like(ls, 1.0 / N))
            if w is not None:
                cots.append(w.to(ls.dtype))
            (g,) = vmap(pull)(torch.stack(cots))
            return g

        chunk = n if traj_chunk is None else max(1, int(traj_chunk))
        rows = max(1, int(rows))
        total: Optional[Dict[str, torch.Tensor]] = None
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            p = {k: v[sl] for k, v in params.items()}
            acc = None
            for r in range(0, N, rows):
                x, y = X[r : r + rows], Y[r : r + rows]
                w = None if weights is None else weights[sl, r : r + rows]
                g = vmap(one, in_dims=(0, None, None, None if w is None else 0), randomness="different")(p, x, y, w)
                acc = g if acc is None else {k: acc[k] + g[k] for k in g}
            if total is None:
                total = {k: v.new_empty((n, *v.shape[1:])) for k, v in acc.items()}
            for k, v in acc.items():
                total[k][sl] = v
        # total[k]: (n, n_cot, *shape)
        grad = {k: v[:, 0] for k, v in total.items()} if drift else None
        inc = None if weights is None else {k: v[:, -1] for k, v in total.items()}
        return grad, inc
