"""The coupled engine: exact per-sample gradients through cross-sample couplings.

With BatchNorm in training mode every per-sample loss ℓ_i depends on all samples of the
batch through the batch mean and variance, so the per-sample gradient is
g_i = ∂ℓ_i/∂θ through the shared statistics (docs/theory.md §8). The engine obtains it from
the step's own graph with batched vector-Jacobian products: ``torch.autograd.grad`` of
the vector of per-sample losses against rows of the identity, ``is_grads_batched=True``,
a chunk of rows at a time (``chunk_bytes`` bounds the chunk of per-sample gradients),
then runs the ordinary backward of ``losses.mean()``. Because it differentiates the very
graph of the step, Dropout masks are the step's own. It applies to any model, coupled or
not, at a price: every row is a backward pass through the whole batch's graph, so a
tracked step costs about M plain backward passes (docs/performance.md has the timings),
and a chunk of rows holds that many copies
of the batch's activation gradients (4× the plain step's memory there; lower
``chunk_bytes`` to bound it). Use a sparse schedule for such models.

If a batching rule is missing for some operation the engine falls back to one backward
per sample (same numbers, slower) and says so once. The gradient with respect to a tied
weight is the total derivative over every use, whatever module applies it.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Optional

import torch

from .base import VECTORISED_CHUNK_BYTES, Engine, LayerStatistics, StatisticsAccumulator

__all__ = ["CoupledEngine"]


class CoupledEngine(Engine):
    """Per-sample statistics by batched vector-Jacobian products of the per-sample losses.

    Args:
        model, layers, split, chunk_bytes: as for :class:`~sdelip.engines.base.Engine`.
        batched: use ``is_grads_batched`` (default); False loops over samples.
    """

    name = "coupled"
    handles_coupling = True

    def __init__(self, model, layers, split: bool = True, chunk_bytes: Optional[int] = None, batched: bool = True):
        super().__init__(model, layers, split, VECTORISED_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
        self.batched = bool(batched)

    def backward(self, losses, directions: Mapping[str, tuple[torch.Tensor, torch.Tensor]], batch=None,
                 step: Optional[int] = None) -> dict[str, LayerStatistics]:
        M = losses.shape[0]
        weights = [layer.weight for layer in self.layers]
        accs = {}
        for layer in self.layers:
            u1, v1 = directions[layer.name]
            accs[layer.name] = StatisticsAccumulator(M, layer.shape, u1, v1, self.split)
        per_sample = 2 * sum(w.numel() * w.element_size() for w in weights)
        c = self._chunk(M, per_sample)
        eye = torch.eye(M, dtype=losses.dtype, device=losses.device)
        done = 0
        if self.batched:
            try:
                for s in range(0, M, c):
                    e = min(M, s + c)
                    grads = torch.autograd.grad(
                        losses, weights, grad_outputs=eye[s:e], retain_graph=True,
                        is_grads_batched=True, allow_unused=True,
                    )
                    self._add(accs, s, e, grads)
                    done = e
            except RuntimeError as exc:
                if done > 0 or "batch" not in str(exc).lower() and "vmap" not in str(exc).lower():
                    raise
                warnings.warn(
                    f"coupled engine: batched vector-Jacobian products failed ({exc}); falling back to one "
                    "backward per sample", RuntimeWarning, stacklevel=3,
                )
                self.batched = False
        if not self.batched:
            for i in range(M):
                grads = torch.autograd.grad(losses[i], weights, retain_graph=True, allow_unused=True)
                self._add(accs, i, i + 1, [None if g is None else g.unsqueeze(0) for g in grads])
        losses.mean().backward()
        out = {}
        for layer in self.layers:
            st = accs[layer.name].result()
            st.check_finite(layer.name, step)
            out[layer.name] = st
        return out

    def _add(self, accs, s, e, grads) -> None:
        with torch.no_grad():
            for layer, G in zip(self.layers, grads):
                if G is None:
                    G = torch.zeros(e - s, *layer.shape, dtype=accs[layer.name].u1.dtype, device=accs[layer.name].u1.device)
                accs[layer.name].add_per_sample(s, G.reshape(e - s, *layer.shape), overwrite=True)
