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

from ..core.statistics import ScaleFn, check_scale
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
    handles_autocast = True

    def __init__(self, model, layers, split: bool = True, chunk_bytes: Optional[int] = None, batched: bool = True):
        super().__init__(model, layers, split, VECTORISED_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
        self.batched = bool(batched)

    def backward(self, losses, directions: Mapping[str, tuple[torch.Tensor, torch.Tensor]], batch=None,
                 step: Optional[int] = None, scale: Optional[ScaleFn] = None) -> dict[str, LayerStatistics]:
        """:meth:`Engine.backward`; with ``scale``, the backward of the mean loss keeps the graph and, once
        S is known, a second pass of vector-Jacobian products projects S ∘ g_i (unless the whole batch
        was one chunk, whose per-sample gradients are kept instead)."""
        M = losses.shape[0]
        weights = [layer.weight for layer in self.layers]
        accs = {}
        split = self.split or scale is not None
        for layer in self.layers:
            u1, v1 = directions[layer.name]
            accs[layer.name] = StatisticsAccumulator(M, layer.shape, u1, v1, split)
        per_sample = 2 * sum(w.numel() * w.element_size() for w in weights)
        c = self._chunk(M, per_sample)
        eye = torch.eye(M, dtype=losses.dtype, device=losses.device)
        done = 0
        kept = None
        if self.batched:
            try:
                for s in range(0, M, c):
                    e = min(M, s + c)
                    grads = torch.autograd.grad(
                        losses, weights, grad_outputs=eye[s:e], retain_graph=True,
                        is_grads_batched=True, allow_unused=True,
                    )
                    if scale is not None and c >= M:  # one chunk: keep it for S ∘ g_i
                        kept = [None if g is None else g.detach().clone() for g in grads]
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
        losses.mean().backward(retain_graph=scale is not None and kept is None)
        out = {}
        for layer in self.layers:
            st = accs[layer.name].result()
            st.check_finite(layer.name, step)
            out[layer.name] = st
        if scale is not None:
            self._scaled_pass(losses, out, accs, scale, kept, c, step)
        return out

    def _scaled_pass(self, losses, out, accs, scale, kept, c: int, step) -> None:
        """S = scale(name, ḡ, diag Σ̂) per layer; the layers with S get the projections of S ∘ g_i."""
        M = losses.shape[0]
        S = {}
        with torch.no_grad():
            for layer in self.layers:
                st, acc = out[layer.name], accs[layer.name]
                S[layer.name] = check_scale(scale(layer.name, st.mean(), st.noise_var()), layer.shape, acc.u1,
                                            layer.name, step)
        todo = [k for k, layer in enumerate(self.layers) if S[layer.name] is not None]
        if not todo:
            return
        weights = [self.layers[k].weight for k in todo]

        def add(s, e, grads):
            with torch.no_grad():
                for k, G in zip(todo, grads):
                    layer = self.layers[k]
                    acc = accs[layer.name]
                    if G is None:
                        G = torch.zeros(e - s, *layer.shape, dtype=acc.u1.dtype, device=acc.u1.device)
                    acc.add_scaled(s, G.reshape(e - s, *layer.shape), S[layer.name])

        if kept is not None:
            add(0, M, [kept[k] for k in todo])
        elif self.batched:
            eye = torch.eye(M, dtype=losses.dtype, device=losses.device)
            for s in range(0, M, c):
                e = min(M, s + c)
                add(s, e, torch.autograd.grad(losses, weights, grad_outputs=eye[s:e], retain_graph=e < M,
                                              is_grads_batched=True, allow_unused=True))
        else:
            for i in range(M):
                grads = torch.autograd.grad(losses[i], weights, retain_graph=i < M - 1, allow_unused=True)
                add(i, i + 1, [None if g is None else g.unsqueeze(0) for g in grads])
        for k in todo:
            name = self.layers[k].name
            out[name].scale = S[name]
            out[name].check_finite(name, step)

    def _add(self, accs, s, e, grads) -> None:
        with torch.no_grad():
            for layer, G in zip(self.layers, grads):
                if G is None:
                    G = torch.zeros(e - s, *layer.shape, dtype=accs[layer.name].u1.dtype, device=accs[layer.name].u1.device)
                accs[layer.name].add_per_sample(s, G.reshape(e - s, *layer.shape), overwrite=True)
