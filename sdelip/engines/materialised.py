"""The materialised engine: per-sample gradients by ``torch.func.vmap`` over the samples.

For any differentiable model whose samples are independent, g_i = ∇_θ ℓ(θ; x_i, y_i) is
computed as ``vmap(grad(ℓ))`` over the mini-batch, a chunk of samples at a time, and
reduced to the statistics of :class:`~sdelip.engines.base.LayerStatistics`. This is how
the paper obtained its numbers (every per-sample gradient materialised); in sdelip it is
the oracle for the factored engine and the fallback for layers or models the hooks do
not cover.

It recomputes the forward pass sample by sample, so it needs the mini-batch
``batch=(inputs, targets)`` and a ``loss_fn(outputs, targets)`` returning the per-sample
losses. Random layers (Dropout in training mode) draw fresh masks in that recomputation
— a different realisation than the masks of the step's own forward pass; the draws come
from a forked RNG, so the training run's random stream is unchanged. Use the factored or
coupled engine to see the very masks of the step.

A tied weight (one Parameter held by several modules, or a module called several times)
is one parameter of the functional call, so its per-sample gradient is the total
derivative over every use, as Thm 14 needs for that one θ.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch.func import functional_call, grad, vmap

from ..core.statistics import ScaleFn, check_scale
from .base import VECTORISED_CHUNK_BYTES, Engine, LayerStatistics, StatisticsAccumulator

__all__ = ["MaterialisedEngine", "fork_rng"]


def fork_rng(device: torch.device):
    """A ``torch.random.fork_rng`` that also forks the RNG of ``device`` when it is an accelerator."""
    devices = [] if device.type == "cpu" else [device.index if device.index is not None else 0]
    kwargs = {} if device.type in ("cpu", "cuda") else {"device_type": device.type}
    return torch.random.fork_rng(devices=devices, **kwargs)


class MaterialisedEngine(Engine):
    """Per-sample statistics from materialised per-sample gradients (``torch.func.vmap``).

    Args:
        model, layers, split, chunk_bytes: as for :class:`~sdelip.engines.base.Engine`.
        loss_fn: ``loss_fn(outputs, targets)`` → per-sample losses (or their sum) of the
            loss that is optimised, e.g. ``functools.partial(F.cross_entropy, reduction="none")``.
        chunk_size: samples per vmap call; default from ``chunk_bytes``.
    """

    name = "materialised"
    needs_batch = True

    def __init__(self, model, layers, split: bool = True, chunk_bytes: Optional[int] = None,
                 loss_fn: Optional[Callable] = None, chunk_size: Optional[int] = None, check_gradient: bool = True):
        super().__init__(model, layers, split, VECTORISED_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
        self.loss_fn = loss_fn
        self.check_gradient = bool(check_gradient)
        if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        names = {id(p): n for n, p in model.named_parameters()}
        self._pnames = {}
        for layer in self.layers:
            pname = names.get(id(layer.weight))
            if pname is None:
                raise ValueError(f"the weight of layer {layer.name!r} is not a parameter of the model")
            self._pnames[layer.name] = pname

    def backward(self, losses, directions: Mapping[str, tuple[torch.Tensor, torch.Tensor]], batch=None,
                 step: Optional[int] = None, scale: Optional[ScaleFn] = None) -> dict[str, LayerStatistics]:
        """:meth:`Engine.backward`; with ``scale``, a second pass over the same chunks (the same random
        draws: both passes start from the same forked RNG state) projects S ∘ g_i once S is known,
        unless the whole batch is one chunk, whose per-sample gradients are kept instead."""
        if batch is None or not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "the materialised engine recomputes per-sample gradients with torch.func and needs the "
                "mini-batch: call tracker.backward(losses, batch=(inputs, targets))"
            )
        if self.loss_fn is None:
            raise ValueError(
                "the materialised engine needs loss_fn(outputs, targets) -> per-sample losses; pass "
                "Tracker(..., loss_fn=functools.partial(F.cross_entropy, reduction='none'))"
            )
        x, y = batch
        M = losses.shape[0]
        if x.shape[0] != M or (isinstance(y, torch.Tensor) and y.ndim > 0 and y.shape[0] != M):
            raise ValueError(
                f"batch has {x.shape[0]} inputs but {M} per-sample losses were passed at step {step}"
            )
        before = {layer.name: None if layer.weight.grad is None else layer.weight.grad.detach().clone()
                  for layer in self.layers}
        losses.mean().backward()
        step_grads = {}
        for layer in self.layers:
            g = layer.weight.grad
            g = torch.zeros_like(layer.weight) if g is None else g.detach()
            step_grads[layer.name] = g if before[layer.name] is None else g - before[layer.name]
        model, loss_fn = self.model, self.loss_fn
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        wnames = [self._pnames[layer.name] for layer in self.layers]

        def sample_loss(wts, xi, yi):
            p = dict(params)
            p.update(wts)
            out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return loss_fn(out, yi.unsqueeze(0)).sum()

        per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
        wts = {pn: params[pn] for pn in wnames}
        elem = next(iter(wts.values())).element_size()
        per_sample = 3 * elem * sum(w.numel() for w in wts.values())
        c = self.chunk_size or self._chunk(M, per_sample)
        accs = {}
        split = self.split or scale is not None
        for layer in self.layers:
            u1, v1 = directions[layer.name]
            accs[layer.name] = StatisticsAccumulator(M, layer.shape, u1, v1, split)
        self._directions = directions
        kept = None
        with torch.no_grad(), fork_rng(x.device):
            for s in range(0, M, c):
                e = min(M, s + c)
                with torch.enable_grad():
                    G = per_sample_grad(wts, x[s:e], y[s:e])
                if scale is not None and c >= M:  # one chunk: keep it for S ∘ g_i
                    kept = {pn: G[pn].reshape(e - s, *layer.shape).clone()
                            for layer, pn in zip(self.layers, wnames)}
                for layer, pn in zip(self.layers, wnames):
                    accs[layer.name].add_per_sample(s, G[pn].reshape(e - s, *layer.shape), overwrite=True)
                del G
        out = {}
        for layer in self.layers:
            st = accs[layer.name].result()
            st.check_finite(layer.name, step)
            if self.check_gradient:
                self._check_step_gradient(layer, st, step_grads[layer.name], M, step)
            out[layer.name] = st
        if scale is None:
            return out
        S = {}
        with torch.no_grad():
            for layer in self.layers:
                st, acc = out[layer.name], accs[layer.name]
                S[layer.name] = check_scale(scale(layer.name, st.mean(), st.noise_var()), layer.shape, acc.u1,
                                            layer.name, step)
        todo = [(layer, pn) for layer, pn in zip(self.layers, wnames) if S[layer.name] is not None]
        if todo:
            with torch.no_grad(), fork_rng(x.device):
                for s in range(0, M, c):
                    e = min(M, s + c)
                    if kept is not None:
                        G = kept
                    else:
                        with torch.enable_grad():
                            G = per_sample_grad(wts, x[s:e], y[s:e])
                    for layer, pn in todo:
                        accs[layer.name].add_scaled(s, G[pn].reshape(e - s, *layer.shape), S[layer.name])
                    del G
            kept = None
        for layer, _ in todo:
            st = out[layer.name]
            st.Gv, st.Gtu, st.scale = accs[layer.name].Gv, accs[layer.name].Gtu, S[layer.name]
            st.check_finite(layer.name, step)
        return out

    def _check_step_gradient(self, layer, st: LayerStatistics, step_grad: torch.Tensor, M: int, step) -> None:
        """The batch mean of loss_fn's per-sample gradients must be the gradient the step applied.

        Compared on the top singular pair: Σ_i g_i v1 and Σ_i g_iᵀ u1 against M·∇θ mean(losses)
        projected, the gradient of the step's own backward. A mismatch means ``loss_fn`` is not
        the loss whose gradient the step applied (a penalty term left out, another reduction,
        fresh dropout masks, a precision the recomputation does not reproduce).
        """
        G = layer.rule.matrix(step_grad).to(st.Gv.dtype) * M
        acc_u1, acc_v1 = self._directions[layer.name]
        want = torch.cat([G @ acc_v1, G.mT @ acc_u1])
        got = torch.cat([st.Gv.sum(0), st.Gtu.sum(0)])
        diff, size = float((got - want).norm()), max(float(got.norm()), float(want.norm()))
        rtol = 1e-6 if got.dtype == torch.float64 else 1e-3
        if diff > rtol * size + 1e-30:
            from ..errors import LossMismatchError

            raise LossMismatchError(
                f"layer {layer.name!r} at step {step}: the per-sample gradients of loss_fn sum to a gradient "
                f"{diff / max(size, 1e-300):.3g} (relative) away from the gradient of the step's own "
                "losses.mean(): loss_fn is not the loss whose gradient the step applied (a penalty or "
                "regularisation term in the losses but not in loss_fn, e.g. a gradient penalty; dropout in "
                "training mode, whose masks the recomputation draws afresh; another reduction). The numbers would "
                "describe another loss: make loss_fn return the very per-sample losses passed to "
                "tracker.backward, or use engine='coupled' (it differentiates those losses themselves)"
            )
