"""nn.Linear: g_i = Σ_p δ_ip x_ipᵀ over any leading axes (docs/theory.md §8).

Without a position axis, nothing of size M·m·n is formed:

    g_i v1 = δ_i (x_i · v1),   g_iᵀ u1 = x_i (δ_i · u1),
    Σ_i g_i = δᵀ x,            Σ_i g_i ∘ g_i = (δ ∘ δ)ᵀ (x ∘ x).

With an elementwise preconditioner S (m, n) (Adam's D), the projections of S ∘ g_i are

    (S ∘ g_i) v1 = Σ_p δ_ip ∘ (S (x_ip ∘ v1)),   (S ∘ g_i)ᵀ u1 = Σ_p x_ip ∘ (Sᵀ (δ_ip ∘ u1)),

one product with S per sample and position (:func:`linear_scaled_projections`,
:func:`patch_scaled_projections`).

With position axes (sequences, a Linear on (M, T, d) or, sequence-first, (T, M, d)) the
projections need only the positions, and Σ_i g_i ∘ g_i the per-sample gradients of this
one layer, a chunk of samples at a time (:func:`patch_statistics`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.statistics import LayerStatistics
from .base import LayerRule, Use, register_rule

__all__ = ["LinearRule", "LinearUses", "statistics_buffers", "linear_statistics", "sequence_linear_statistics",
           "patch_statistics", "linear_use_statistics", "linear_scaled_projections", "patch_scaled_projections",
           "linear_use_scaled_projections"]


#: With the split, :func:`sequence_linear_statistics` forms the per-sample gradients of at most this many
#: bytes at a time (or ``chunk_bytes`` if smaller), so that squaring and summing them reads them from the
#: cache: on the transformer's layers (M = T = 32, d = 128) 2 MiB chunks took 20 % less time than
#: 8 MiB ones, one thread (docs/performance.md, issue #30).
CACHE_CHUNK_BYTES = 2 * 2**20


def linear_statistics(x: torch.Tensor, delta: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor, split: bool,
                      with_sum_g: bool = True) -> LayerStatistics:
    """Statistics of a Linear layer from inputs x (M, n) and output gradients δ (M, m).

    g_i = δ_i x_iᵀ; nothing of size M·m·n is formed. ``with_sum_g=False`` leaves Σ g_i
    to the caller (it is M times the weight gradient of the mean loss).
    """
    M = x.shape[0]
    xv = x @ v1  # (M,)
    du = delta @ u1  # (M,)
    Gv = delta * xv[:, None]
    Gtu = x * du[:, None]
    sum_g = sum_sq = None
    if split:
        if with_sum_g:
            sum_g = delta.mT @ x
        sum_sq = delta.square().mT @ x.square()
    return LayerStatistics(M, Gv, Gtu, sum_g, sum_sq)


def patch_statistics(
    Xt: torch.Tensor,
    Dt: torch.Tensor,
    u1: torch.Tensor,
    v1: torch.Tensor,
    split: bool,
    groups: int = 1,
    out: Optional[dict] = None,
    start: int = 0,
) -> None:
    """Accumulate statistics of g_i = Σ_p δ_ip x_ipᵀ for a chunk of samples.

    Args:
        Xt: (c, g·Kg, P) patches, channels first (the layout of ``F.unfold``).
        Dt: (c, g·Og, P) output gradients.
        u1: (g·Og,) and v1: (Kg,) the top singular pair of the (O, Kg) weight matrix.
        split: also accumulate Σ g_i and Σ g_i ∘ g_i.
        groups: g, the number of convolution groups (block structure of g_i).
        out: dict with preallocated ``Gv`` (M, O), ``Gtu`` (M, Kg) and, with split,
            ``sum_g``, ``sum_sq`` (O, Kg), updated in place.
        start: index of the chunk's first sample.
    """
    c, K, P = Xt.shape
    O = Dt.shape[1]
    g = groups
    Kg, Og = K // g, O // g
    if g > 1:
        Xt = Xt.reshape(c * g, Kg, P)
        Dt = Dt.reshape(c * g, Og, P)
    # Projections from the patches cost P·(Kg + Og) per sample, from the per-sample gradient Og·Kg.
    from_patches = not split or P * (Kg + Og) < Og * Kg
    if split:
        G = torch.bmm(Dt, Xt.mT)  # (c·g, Og, Kg): the per-sample gradients of this chunk
        if g > 1:
            G = G.reshape(c, O, Kg)
        if not from_patches:
            torch.matmul(G, v1, out=out["Gv"][start : start + c])
            torch.matmul(G.mT, u1, out=out["Gtu"][start : start + c])
        if "sum_g" in out:
            out["sum_g"] += G.sum(0)
        out["sum_sq"] += G.square_().sum(0)
        del G
    if from_patches:
        xv = torch.matmul(Xt.mT, v1)  # (c·g, P)
        if g == 1:  # row vector times matrix per sample: one product each, no elementwise pass over δ
            torch.bmm(xv.unsqueeze(1), Dt.mT, out=out["Gv"][start : start + c].unsqueeze(1))
            du = torch.matmul(Dt.mT, u1)  # (c, P)
            torch.bmm(du.unsqueeze(1), Xt.mT, out=out["Gtu"][start : start + c].unsqueeze(1))
            return
        Gv = torch.bmm(Dt, xv.unsqueeze(-1)).squeeze(-1)  # (c·g, Og)
        out["Gv"][start : start + c] = Gv.reshape(c, O)
        du = (Dt.reshape(c, g, Og, P) * u1.reshape(1, g, Og, 1)).sum(2).reshape(c * g, P)
        Gtu = torch.bmm(Xt, du.unsqueeze(-1)).squeeze(-1)  # (c·g, Kg)
        out["Gtu"][start : start + c] = Gtu.reshape(c, g, Kg).sum(1)


def sequence_linear_statistics(
    x: torch.Tensor, delta: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor, split: bool, chunk_bytes: int,
    with_sum_g: bool = True,
) -> LayerStatistics:
    """Statistics of a Linear layer applied along extra axes: x (M, …, n), δ (M, …, m)."""
    M, n, m = x.shape[0], x.shape[-1], delta.shape[-1]
    X = x.reshape(M, -1, n)
    D = delta.reshape(M, -1, m)
    P = X.shape[1]
    per_sample = x.element_size() * (P * (n + m) + (m * n if split else 0))
    budget = min(chunk_bytes, CACHE_CHUNK_BYTES) if split else chunk_bytes
    c = int(max(1, min(M, budget // max(1, per_sample))))
    out = statistics_buffers(M, m, n, split, with_sum_g, u1)
    for s in range(0, M, c):
        e = min(M, s + c)
        patch_statistics(X[s:e].mT, D[s:e].mT, u1, v1, split, 1, out, s)
    return LayerStatistics(M, out["Gv"], out["Gtu"], out.get("sum_g"), out.get("sum_sq"))


def statistics_buffers(M: int, m: int, n: int, split: bool, with_sum_g: bool, like: torch.Tensor) -> dict:
    """The buffers that :func:`patch_statistics` fills chunk by chunk: ``Gv`` (M, m), ``Gtu`` (M, n) and, with the
    split, ``sum_sq`` (m, n) and (unless ``with_sum_g`` is False) ``sum_g``, in ``like``'s dtype and device."""
    kw = dict(dtype=like.dtype, device=like.device)
    out = {"Gv": torch.empty(M, m, **kw), "Gtu": torch.empty(M, n, **kw)}
    if split:
        if with_sum_g:
            out["sum_g"] = torch.zeros(m, n, **kw)
        out["sum_sq"] = torch.zeros(m, n, **kw)
    return out


def linear_use_statistics(x: torch.Tensor, delta: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor, split: bool,
                          chunk_bytes: int, with_sum_g: bool = True) -> LayerStatistics:
    """Statistics of a linear map applied to batch-first x (M, …, n) with output gradient δ (M, …, m)."""
    if x.ndim == 2:
        return linear_statistics(x.to(u1.dtype), delta.to(u1.dtype), u1, v1, split, with_sum_g)
    return sequence_linear_statistics(x, delta, u1, v1, split, chunk_bytes, with_sum_g)


def linear_scaled_projections(x: torch.Tensor, delta: torch.Tensor, S: torch.Tensor, u1: torch.Tensor,
                              v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S ∘ g_i) v1 = δ_i ∘ (S (x_i ∘ v1)) (M, m) and (S ∘ g_i)ᵀ u1 = x_i ∘ (Sᵀ (δ_i ∘ u1)) (M, n), g_i = δ_i x_iᵀ.

    x (M, n), δ (M, m), S (m, n); one O(M·m·n) product each, no per-sample matrix.
    """
    return delta * ((x * v1) @ S.mT), x * ((delta * u1) @ S)


def patch_scaled_projections(Xt: torch.Tensor, Dt: torch.Tensor, S: torch.Tensor, u1: torch.Tensor,
                             v1: torch.Tensor, groups: int = 1,
                             route: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S ∘ g_i) v1 and (S ∘ g_i)ᵀ u1 of g_i = Σ_p δ_ip x_ipᵀ for a chunk of samples.

    Args:
        Xt: (c, g·Kg, P) patches, channels first; Dt: (c, g·Og, P) output gradients.
        S: (g·Og, Kg) the elementwise preconditioner; u1 (g·Og,), v1 (Kg,).
        groups: g (block structure of g_i: the rows of group j see channels j·Kg..(j+1)·Kg−1).
        route: ``"patches"``: Σ_p δ_ip ∘ (S_j (x_ip ∘ v1)) and Σ_j Σ_p x_ip ∘ (S_jᵀ (δ_ip ∘ u1_j)) by
            batched matmuls (2·P·Og·Kg per sample and group); ``"per_sample"``: the chunk's g_i
            (one bmm, P·Og·Kg) then (S ∘ g_i) v1, (S ∘ g_i)ᵀ u1 (3·Og·Kg); None: the cheaper
            (patches only for P ≤ 2).

    Returns:
        (c, g·Og) and (c, Kg).
    """
    c, K, P = Xt.shape
    O = Dt.shape[1]
    g = groups
    Kg, Og = K // g, O // g
    if route is None:
        route = "patches" if P <= 2 else "per_sample"
    Xg = Xt.reshape(c, g, Kg, P)
    Dg = Dt.reshape(c, g, Og, P)
    Sg = S.reshape(g, Og, Kg)
    if route == "patches":
        Gv = (Dg * (Sg @ (Xg * v1.reshape(Kg, 1)))).sum(-1).reshape(c, O)
        Gtu = (Xg * (Sg.mT @ (Dg * u1.reshape(g, Og, 1)))).sum(-1).sum(1)
        return Gv, Gtu
    if route != "per_sample":
        raise ValueError(f"route must be 'patches', 'per_sample' or None, got {route!r}")
    SG = (Dg @ Xg.mT).mul_(Sg)  # (c, g, Og, Kg): S ∘ g_i of the chunk
    Gv = (SG @ v1).reshape(c, O)
    Gtu = (SG.mT @ u1.reshape(g, Og, 1)).squeeze(-1).sum(1)
    return Gv, Gtu


def linear_use_scaled_projections(x: torch.Tensor, delta: torch.Tensor, S: torch.Tensor, u1: torch.Tensor,
                                  v1: torch.Tensor, chunk_bytes: int,
                                  route: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S ∘ g_i) v1 (M, m) and (S ∘ g_i)ᵀ u1 (M, n) of a linear map on batch-first x (M, …, n), δ (M, …, m).

    g_i = Σ_p δ_ip x_ipᵀ over the positions p of the middle axes; a chunk of samples at a
    time (``chunk_bytes``) when there are positions.
    """
    x, delta = x.to(u1.dtype), delta.to(u1.dtype)
    if x.ndim == 2:
        return linear_scaled_projections(x, delta, S, u1, v1)
    M, n, m = x.shape[0], x.shape[-1], delta.shape[-1]
    X = x.reshape(M, -1, n)
    D = delta.reshape(M, -1, m)
    P = X.shape[1]
    per_sample = x.element_size() * (P * (n + m) + max(m * n, P * max(m, n)))
    c = int(max(1, min(M, chunk_bytes // max(1, per_sample))))
    Gv = torch.empty(M, m, dtype=u1.dtype, device=u1.device)
    Gtu = torch.empty(M, n, dtype=u1.dtype, device=u1.device)
    for s in range(0, M, c):
        e = min(M, s + c)
        Gv[s:e], Gtu[s:e] = patch_scaled_projections(X[s:e].mT, D[s:e].mT, S, u1, v1, 1, route)
    return Gv, Gtu


def linear_per_sample_grads(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """g_i = Σ_p δ_ip x_ipᵀ of batch-first x (c, …, n) and δ (c, …, m): shape (c, m, n)."""
    c, n, m = x.shape[0], x.shape[-1], delta.shape[-1]
    return delta.reshape(c, -1, m).mT @ x.reshape(c, -1, n)


class LinearUses(LayerRule):
    """A rule whose every use is a linear map g_i = Σ_p δ_ip x_ipᵀ of its input (Linear, attention's projections)."""

    def statistics(self, use: Use, u1, v1, split, chunk_bytes, with_sum_g=True) -> LayerStatistics:
        x, d = self.batch_first(use)
        return linear_use_statistics(x, d, u1, v1, split, chunk_bytes, with_sum_g)

    def per_sample_grads(self, use: Use, start: int, stop: int) -> torch.Tensor:
        x, d = self.batch_first(use)
        return linear_per_sample_grads(x[start:stop], d[start:stop])

    def scaled_projections(self, use: Use, S, u1, v1, M, chunk_bytes):
        x, d = self.batch_first(use)
        return linear_use_scaled_projections(x, d, S, u1, v1, chunk_bytes)


@register_rule(nn.Linear)
class LinearRule(LinearUses):
    """nn.Linear (and subclasses) applied to inputs with any leading axes; θ is the (out, in) weight."""

    name = "linear"
    sde_factored = True

    def trajectory_projections(self, module, attr, x, delta, u1, v1, chunk_bytes):
        if x.ndim == 3:  # (c, M, n): one vmap over the trajectories
            return _linear_projections(x, delta, u1, v1)
        return super().trajectory_projections(module, attr, x, delta, u1, v1, chunk_bytes)


def _pair(stats):
    return stats.Gv, stats.Gtu


_linear_projections = torch.vmap(lambda x, d, u, v: _pair(linear_statistics(x, d, u, v, False)))
