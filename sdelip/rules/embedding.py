"""nn.Embedding: a sparse per-sample gradient, never a dense V × d per sample (docs/theory.md §8).

θ is the (V, d) table; the per-sample gradient of sample i puts the output gradient of
each of its positions p on the row of its index: g_i = Σ_p e_{idx_ip} δ_ipᵀ (rows of
``padding_idx`` receive nothing, as in PyTorch's backward). With a_ip = δ_ip · v1:

    (g_i v1)_r = Σ_{p: idx_ip = r} a_ip          (a scatter-add, (M, V)),
    g_iᵀ u1   = Σ_p u1[idx_ip] δ_ip              ((M, d)),
    Σ_i g_i   = scatter of all δ_ip on their rows,
    Σ_i g_i ∘ g_i = Σ_(i, r) (Σ_{p: idx_ip = r} δ_ip)²  over the distinct (sample, row) pairs.

With an elementwise preconditioner S (V, d), only the rows of the indices are read:

    ((S ∘ g_i) v1)_r = Σ_{p: idx_ip = r} δ_ip · (S[r] ∘ v1),   (S ∘ g_i)ᵀ u1 = Σ_p u1[idx_ip] S[idx_ip] ∘ δ_ip.

``max_norm`` (the forward renormalises rows in place, which is not an SGD update) and
``scale_grad_by_freq`` (the gradient depends on the batch's counts, coupling the
samples) are refused with the layer's name.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.statistics import LayerStatistics
from .base import LayerRule, Use, register_rule

__all__ = ["EmbeddingRule", "embedding_statistics", "embedding_per_sample_grads", "embedding_scaled_projections"]


def _flat(idx: torch.Tensor, delta: torch.Tensor, padding_idx):
    """Indices (M, P) and output gradients (M, P, d), padding positions zeroed."""
    M, d = idx.shape[0], delta.shape[-1]
    idx = idx.reshape(M, -1)
    D = delta.reshape(M, -1, d)
    if padding_idx is not None:
        D = D * (idx != padding_idx).unsqueeze(-1).to(D.dtype)
    return idx, D


def embedding_statistics(idx: torch.Tensor, delta: torch.Tensor, num_embeddings: int, padding_idx,
                         u1: torch.Tensor, v1: torch.Tensor, split: bool, with_sum_g: bool = True) -> LayerStatistics:
    """Statistics of an embedding use: batch-first indices (M, …) and output gradients (M, …, d)."""
    idx, D = _flat(idx, delta.to(u1.dtype), padding_idx)
    M, P, d = D.shape
    V = num_embeddings
    a = D @ v1  # (M, P)
    Gv = torch.zeros(M, V, dtype=u1.dtype, device=u1.device).scatter_add_(1, idx, a)
    Gtu = (u1[idx].unsqueeze(-1) * D).sum(1)
    sum_g = sum_sq = None
    if split:
        flat_idx, flat_D = idx.reshape(-1), D.reshape(-1, d)
        if with_sum_g:
            sum_g = torch.zeros(V, d, dtype=u1.dtype, device=u1.device).index_add_(0, flat_idx, flat_D)
        # distinct (sample, row) pairs: each sample's gradient on a row is the sum over its positions
        key = (torch.arange(M, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
        keys, inv = torch.unique(key, return_inverse=True)
        rows = torch.zeros(keys.numel(), d, dtype=u1.dtype, device=u1.device).index_add_(0, inv, flat_D)
        sum_sq = torch.zeros(V, d, dtype=u1.dtype, device=u1.device).index_add_(0, keys % V, rows.square_())
    return LayerStatistics(M, Gv, Gtu, sum_g, sum_sq)


def embedding_scaled_projections(idx: torch.Tensor, delta: torch.Tensor, num_embeddings: int, padding_idx,
                                 S: torch.Tensor, u1: torch.Tensor,
                                 v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S ∘ g_i) v1 (M, V) and (S ∘ g_i)ᵀ u1 (M, d) of g_i = Σ_p e_{idx_ip} δ_ipᵀ, from the rows S[idx_ip] only.

    ((S ∘ g_i) v1)_r = Σ_{p: idx_ip = r} δ_ip · (S[r] ∘ v1) (a scatter-add) and
    (S ∘ g_i)ᵀ u1 = Σ_p u1[idx_ip] (S[idx_ip] ∘ δ_ip); padding positions contribute nothing.
    """
    idx, D = _flat(idx, delta.to(u1.dtype), padding_idx)
    M = D.shape[0]
    SD = S[idx] * D  # (M, P, d): S[idx_ip] ∘ δ_ip
    Gv = torch.zeros(M, num_embeddings, dtype=u1.dtype, device=u1.device).scatter_add_(1, idx, SD @ v1)
    Gtu = (u1[idx].unsqueeze(-1) * SD).sum(1)
    return Gv, Gtu


def embedding_per_sample_grads(idx: torch.Tensor, delta: torch.Tensor, num_embeddings: int,
                               padding_idx) -> torch.Tensor:
    """Dense per-sample gradients (c, V, d) of a chunk: only for a table also used by another module."""
    idx, D = _flat(idx, delta, padding_idx)
    c, P, d = D.shape
    G = torch.zeros(c, num_embeddings, d, dtype=D.dtype, device=D.device)
    return G.scatter_add_(1, idx.unsqueeze(-1).expand(c, P, d), D)


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """nn.Embedding with any index shape; θ is the (num_embeddings, embedding_dim) table."""

    name = "embedding"

    def check_module(self, module, path):
        if module.max_norm is not None:
            raise ValueError(
                f"embedding {path!r} has max_norm={module.max_norm}: its forward renormalises rows of the table in "
                "place, which is not an SGD update, so the SDE of Def 4 does not describe it; use max_norm=None"
            )
        if module.scale_grad_by_freq:
            raise ValueError(
                f"embedding {path!r} has scale_grad_by_freq=True: its gradient divides by the counts of the indices "
                "in the mini-batch, which couples the samples (no per-sample gradient exists); use "
                "scale_grad_by_freq=False"
            )

    def batch_axes(self, use: Use, M: int) -> list[int]:
        return [a for a in range(use.x.ndim) if use.x.shape[a] == M]

    def statistics(self, use: Use, u1, v1, split, chunk_bytes, with_sum_g=True) -> LayerStatistics:
        idx, d = self.batch_first(use)
        m = use.module
        return embedding_statistics(idx, d, m.num_embeddings, m.padding_idx, u1, v1, split, with_sum_g)

    def per_sample_grads(self, use: Use, start: int, stop: int) -> torch.Tensor:
        idx, d = self.batch_first(use)
        m = use.module
        return embedding_per_sample_grads(idx[start:stop], d[start:stop], m.num_embeddings, m.padding_idx)

    def scaled_projections(self, use: Use, S, u1, v1, M, chunk_bytes):
        idx, d = self.batch_first(use)
        m = use.module
        return embedding_scaled_projections(idx, d, m.num_embeddings, m.padding_idx, S, u1, v1)
