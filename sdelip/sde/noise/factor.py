"""The factor G of Def 4's diffusion, and the Euler increments G·v it gives.

Prop 5's noise covariance Σ̂ = ΩᵀΩ/M has the exact factor G = Ωᵀ/√M: column i of the
diffusion √η s G is √η s (g_i − ḡ)/√(M(M−1)) (s the drift-noise compensation of
:class:`~sdelip.sde.ParameterSDE`; docs/theory.md §3). An Euler increment G·v is then
Σ_i (c_i − c̄) g_i with c_i = √η s v_i/√(M(M−1)): the gradient of a weighted mini-batch
loss (the factored engine, :mod:`sdelip.sde.noise.factored`), or the product with the
materialised columns. With reshuffled sampling the columns run over all N training
samples, with √(M(N − 1)) in place of √(M(M−1)).

The functions take the system (its layout, noise blocks, engine and data) and one
:class:`~sdelip.sde.evaluation.Evaluation`.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..evaluation import Evaluation, NoiseObserver
from .materialised import GradientEstimate

__all__ = ["centred_rows", "block_weights", "reshuffle_weights", "rows_times", "factored_increments",
           "reshuffled_evaluation", "reshuffled_increments"]


def centred_rows(sde, n: int, est: GradientEstimate) -> list:
    """Per parameter, √η s (g_i − ḡ)/√(M(M−1)) as (n, M, numel): the columns of G (N columns reshuffled)."""
    M = sde.noise_width
    scale = sde.column_scale()
    rows = []
    for spec in sde.layout.specs:
        G = est.per_sample[spec.name]
        G = G.reshape(G.shape[0], G.shape[1], -1)  # (n or 1, M, numel)
        if G.shape[1] != M:
            raise ValueError(f"gradient_fn returned {G.shape[1]} per-sample gradients, expected {M}")
        E = G - G.mean(1, keepdim=True)
        rows.append(E.mul_(scale).expand(n, -1, -1))
    return rows


def block_weights(sde, v: torch.Tensor, dtype) -> Dict[int, torch.Tensor]:
    """Per noise block b, the weights c_i − c̄ of the increment Σ_i (c_i − c̄) g_i, (n, M)."""
    M = sde.M
    w = v.to(dtype).reshape(v.shape[0], -1, M) * sde.column_scale()
    w = w - w.mean(-1, keepdim=True)
    if sde.noise_coupling == "shared":  # one Brownian block drives every noise block
        return {b: w[:, 0] for b in range(len(sde.layout.blocks))}
    return {b: w[:, b] for b in range(w.shape[1])}


def reshuffle_weights(sde, v: torch.Tensor, dtype) -> torch.Tensor:
    """c_i − c̄ with c_i = √η v_i/√(M(N − 1)): the increment √η G v = Σ_i (c_i − c̄) g_i, (n, N)."""
    w = v.to(dtype) * sde.column_scale()
    return w - w.mean(-1, keepdim=True)


def rows_times(sde, rows: list, v: torch.Tensor) -> torch.Tensor:
    """The θ part of G·v (n, P) from the materialised columns ``rows`` (per parameter, (n, M, numel))."""
    out = rows[0].new_zeros(v.shape[0], sde.n_params)
    for spec, E in zip(sde.layout.specs, rows):
        vb = v[:, sde.brownian_slice(spec.block)].to(E.dtype)
        out[:, spec.start : spec.stop] = torch.bmm(vb.unsqueeze(1), E).squeeze(1)
    return out


def factored_increments(sde, ev: Evaluation, v: Optional[torch.Tensor],
                        observer: Optional[NoiseObserver]) -> Optional[torch.Tensor]:
    """The factored noise pass over chunks of trajectories: the θ part of G·v (n, P), or None without v.

    One weighted backward per trajectory on its noise mini-batch ``ev.batch``; with an
    observer the layer inputs and per-sample output gradients of every chunk are
    captured and handed to ``observer.chunk``.
    """
    params, (X, Y) = ev.params, ev.batch
    ref = next(iter(params.values()))
    n = ref.shape[0]
    shared = sde.gradient_fn.shared_noise_batch
    consts = sde.gradient_fn.consts(ref)
    weights = None if v is None else block_weights(sde, v, ref.dtype)
    chunk = sde.chunk_sizes(ref)[0]
    inc = None if v is None else ref.new_empty(n, sde.n_params)
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        p = {k: t[sl] for k, t in params.items()}
        xb, yb = (X, Y) if shared else (X[sl], Y[sl])
        w = None if weights is None else {b: t[sl] for b, t in weights.items()}
        xs, deltas, g = sde.factored(p, consts, xb, yb, weights=w, capture=observer is not None, shared_batch=shared)
        if inc is not None:
            inc[sl] = sde.layout.flatten(g)
        if observer is not None:
            observer.chunk(sl, xs, deltas)
    return inc


def reshuffled_evaluation(sde, t: float, y: torch.Tensor, theta: torch.Tensor, params: Dict[str, torch.Tensor],
                          n: int, v: Optional[torch.Tensor] = None):
    """Reshuffled sampling's evaluation: the full-set drift, and with v the increments, from one pass over the data.

    Returns:
        The :class:`Evaluation`, or (evaluation, θ part of G·v (n, P)) with v.
    """
    if sde.extra_rows is not None:
        raise NotImplementedError("extra state rows need the iid noise mini-batch, not sampling='reshuffle'")
    if sde.engine == "materialised":
        grads = sde.gradient_fn.expected_gradient(params)
        c = Evaluation(t, y, sde.theta_drift(theta, grads), params, grads)
        sde.noise_rows(c)
        return c if v is None else (c, rows_times(sde, c.noise, v))
    grads, inc = _reshuffled_pass(sde, params, theta, v, drift=True)
    c = Evaluation(t, y, sde.theta_drift(theta, grads), params, grads)
    return c if v is None else (c, sde.layout.flatten(inc))


def reshuffled_increments(sde, ev: Evaluation, v: torch.Tensor) -> torch.Tensor:
    """The θ part of G·v (n, P) with reshuffled sampling: the weighted pass over the training set."""
    _, inc = _reshuffled_pass(sde, ev.params, ev.y[:, : sde.n_params].detach(), v, drift=False)
    return sde.layout.flatten(inc)


def _reshuffled_pass(sde, params: Dict[str, torch.Tensor], theta: torch.Tensor, v: Optional[torch.Tensor],
                     drift: bool):
    """One weighted pass over the whole training set: (∇L or None, Σ_i (c_i − c̄) g_i or None without v)."""
    X, Y = sde.data.full(device=theta.device, dtype=theta.dtype)
    _, drift_chunk, rows = sde.chunk_sizes(theta)
    weights = None if v is None else reshuffle_weights(sde, v, theta.dtype)
    return sde.reshuffle(params, sde.gradient_fn.consts(theta), X, Y, weights=weights, drift=drift,
                         traj_chunk=drift_chunk, rows=rows)
