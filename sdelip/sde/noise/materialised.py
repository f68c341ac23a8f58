"""The materialised gradient source of the SDE systems: expected and per-sample gradients by torch.func.

At every trajectory's own parameters (:mod:`sdelip.sde.layout`), :class:`ModelGradients`
evaluates

- the expected gradient ∇L(θ) (the drift of Def 4, docs/theory.md §2), on the whole
  training set when it is small or on an independent large batch, and
- the per-sample gradients g_i = ∇ℓ(θ; x_i, y_i) of a fresh mini-batch of M samples
  (the gradient noise of Prop 5, docs/theory.md §3),

with ``functional_call`` + ``vmap(grad)`` over samples and ``vmap`` over trajectories.
(The tracker's engines, :mod:`sdelip.engines`, are a different thing: they measure one
real step.)

Cost of one evaluation for n trajectories, P parameters, mini-batch M and N samples
for the expected gradient: n·M per-sample forward/backward passes plus n·N batched
ones, and O(n·M·P) memory for the per-sample gradients (chunk the trajectories with
``traj_chunk`` and the data with ``data_chunk`` to bound it).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import attrs
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ...rules.attention import vmap_safe_attention
from .data import DataSource
from ..layout import ParamLayout

__all__ = ["GradientEstimate", "ModelGradients", "activation_numel"]


@attrs.frozen
class GradientEstimate:
    """Gradients at every trajectory's parameters.

    Attributes:
        grad: {name: (n, *shape)} the expected gradient ∇L(θ) (drift, docs/theory.md §2).
        per_sample: {name: (n, M, *shape)} per-sample gradients of a fresh mini-batch
            (Prop 5); tensors may be expanded views.
    """

    grad: Dict[str, torch.Tensor]
    per_sample: Dict[str, torch.Tensor]


def activation_numel(model: nn.Module, params: Dict[str, torch.Tensor], consts: Dict[str, torch.Tensor],
                     x1: torch.Tensor) -> int:
    """Numbers in the input and every leaf module's output for one sample x1 (1, …).

    An estimate of the activations a forward pass keeps per sample, for memory budgets.
    """
    total = [x1[0].numel()]

    def count(mod, inp, out):
        if isinstance(out, torch.Tensor):
            total.append(out[0].numel() if out.ndim else 1)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            functional_call(model, {**consts, **params}, (x1,))
    finally:
        for h in handles:
            h.remove()
    return int(sum(total))


def _couples_samples(model: nn.Module) -> bool:
    from ...engines import coupling_modules

    return bool(coupling_modules(model))


class ModelGradients:
    """Expected and per-sample gradients of a model at a batch of parameter vectors.

    Args:
        model: the network (its trainable parameters are replaced functionally; the
            module itself is never modified).
        layout: the :class:`ParamLayout` of the state.
        data: the :class:`DataSource` of the training set.
        loss_fn: ``loss_fn(output, target)`` returning the *mean* loss over the batch
            (default ``torch.nn.functional.cross_entropy``).
        noise_batch_size: M, the mini-batch size of the noise (≥ 2, Prop 5).
        grad_source: ``"full"`` (the whole training set), ``"batch"`` (an independent
            batch of ``grad_batch_size`` samples per evaluation) or ``"auto"`` (full when
            the training set has at most ``full_max`` samples).
        full_max: threshold of ``"auto"``.
        grad_batch_size: size of the independent batch.
        shared_noise_batch: one noise mini-batch for all trajectories of an evaluation
            (cheaper to draw; the trajectories' diffusion estimates are then correlated)
            instead of one per trajectory (default).
        traj_chunk: trajectories per vmapped call (None: all at once).
        data_chunk: samples per vmapped call of the expected gradient.

    Raises:
        NotImplementedError: the model has a BatchNorm layer in training mode, whose
            per-sample losses are coupled through the batch statistics (docs/theory.md §8).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        data: DataSource,
        loss_fn: Optional[Callable] = None,
        noise_batch_size: int = 32,
        grad_source: str = "auto",
        full_max: int = 10_000,
        grad_batch_size: int = 4096,
        shared_noise_batch: bool = False,
        traj_chunk: Optional[int] = None,
        data_chunk: int = 4096,
    ):
        if _couples_samples(model):
            raise NotImplementedError(
                "BatchNorm in training mode couples the per-sample losses through the batch statistics "
                "(docs/theory.md §8); per-sample gradients by vmap do not apply. Use model.eval() for BatchNorm "
                "layers or a model without them"
            )
        if grad_source not in ("auto", "full", "batch"):
            raise ValueError(f"grad_source must be 'auto', 'full' or 'batch', got {grad_source!r}")
        if grad_source == "auto":
            grad_source = "full" if data.sized and len(data) <= full_max and data.full() is not None else "batch"
        if grad_source == "full" and data.full() is None:
            raise ValueError("grad_source='full' needs a map-style training set small enough to materialise")
        self.model = model
        self.layout = layout
        self.data = data
        self.loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        self.M = int(noise_batch_size)
        if self.M < 2:
            raise ValueError(f"the noise mini-batch needs M >= 2 samples (Prop 5 divides by M − 1), got {self.M}")
        self.grad_source = grad_source
        self.grad_batch_size = int(grad_batch_size)
        self.shared_noise_batch = bool(shared_noise_batch)
        self.traj_chunk = traj_chunk
        self.data_chunk = int(data_chunk)

        loss_fn_ = self.loss_fn
        self._consts: Dict[str, torch.Tensor] = {}

        def batch_loss(p, x, y):
            return loss_fn_(functional_call(model, {**self._consts, **p}, (x,)), y)

        def sample_loss(p, x, y):
            return batch_loss(p, x.unsqueeze(0), y.unsqueeze(0))

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
        in_xy = None if self.shared_noise_batch else 0
        self._per_sample = vmap(per_sample, in_dims=(0, in_xy, in_xy), randomness="different")
        self._batch_grad = vmap(grad(batch_loss), in_dims=(0, None, None), randomness="different")
        self._batch_grad_each = vmap(grad(batch_loss), in_dims=(0, 0, 0), randomness="different")

    def consts(self, ref: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Frozen parameters and buffers, read now (the model may have moved device) and cast to ref's dtype."""
        self._refresh_consts(ref)
        return self._consts

    def _refresh_consts(self, ref: torch.Tensor) -> None:
        consts = {n: p for n, p in self.model.named_parameters() if not p.requires_grad}
        consts.update(dict(self.model.named_buffers()))
        self._consts = {
            k: v.detach().to(device=ref.device, dtype=ref.dtype if v.is_floating_point() else v.dtype)
            for k, v in consts.items()
        }

    def expected_gradient(self, params: Dict[str, torch.Tensor], traj_chunk: Optional[int] = None,
                          data_chunk: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """∇L at each trajectory's parameters ({name: (n, *shape)}).

        ``grad_source="full"``: the mean gradient over the whole training set (the same for
        every evaluation). ``"batch"``: over an independent batch of ``grad_batch_size``
        samples drawn for each trajectory (trajectories stay independent). ``traj_chunk``
        bounds the trajectories per batched call (the constructor's ``traj_chunk`` wins),
        ``data_chunk`` the samples per call (at most the constructor's).
        """
        ref = next(iter(params.values()))
        self._refresh_consts(ref)
        chunk = self.traj_chunk if self.traj_chunk is not None else traj_chunk
        rows = self.data_chunk if data_chunk is None else max(1, min(int(data_chunk), self.data_chunk))
        if self.grad_source == "full":
            X, Y = self.data.full(device=ref.device, dtype=ref.dtype)
            return self._mean_gradient(params, X, Y, False, chunk, rows)
        n = ref.shape[0]
        X, Y = self.data.sample(self.grad_batch_size, n, device=ref.device, dtype=ref.dtype)
        return self._mean_gradient(params, X, Y, True, chunk, rows)

    def _mean_gradient(self, params, X, Y, batched: bool, chunk: Optional[int], rows: int):
        N = X.shape[1] if batched else len(X)
        total = None
        for s in range(0, N, rows):
            if batched:
                xs, ys = X[:, s : s + rows], Y[:, s : s + rows]
                g = self._chunked(lambda p, x, y: self._batch_grad_each(p, x, y), params, xs, ys, chunk=chunk)
            else:
                xs, ys = X[s : s + rows], Y[s : s + rows]
                g = self._chunked(lambda p: self._batch_grad(p, xs, ys), params, chunk=chunk)
            w = ys.shape[-1] / N if batched else len(xs) / N
            total = {k: v * w for k, v in g.items()} if total is None else {k: total[k] + v * w for k, v in g.items()}
        return total

    def noise_batch(self, n: int, ref: torch.Tensor):
        """Draw the noise mini-batches of n trajectories: (n, M, …), or (M, …) when shared."""
        if self.shared_noise_batch:
            return self.data.sample(self.M, device=ref.device, dtype=ref.dtype)
        return self.data.sample(self.M, n, device=ref.device, dtype=ref.dtype)

    def per_sample_gradients(self, params: Dict[str, torch.Tensor], batch=None, traj_chunk: Optional[int] = None
                             ) -> Dict[str, torch.Tensor]:
        """Per-sample gradients of a mini-batch: {name: (n, M, *shape)}.

        Args:
            params: {name: (n, *shape)}.
            batch: (X, Y) from :meth:`noise_batch`; None draws a fresh one.
            traj_chunk: trajectories per batched call (the constructor's ``traj_chunk`` wins).
        """
        ref = next(iter(params.values()))
        self._refresh_consts(ref)
        X, Y = batch if batch is not None else self.noise_batch(ref.shape[0], ref)
        chunk = self.traj_chunk if self.traj_chunk is not None else traj_chunk
        if self.shared_noise_batch:
            return self._chunked(lambda p: self._per_sample(p, X, Y), params, chunk=chunk)
        return self._chunked(lambda p, X, Y: self._per_sample(p, X, Y), params, X, Y, chunk=chunk)

    def _chunked(self, fn, params, *batched, chunk: Optional[int] = None):
        n = next(iter(params.values())).shape[0]
        c = chunk
        with vmap_safe_attention():  # attention dropout drawn per sample under vmap
            if c is None or c >= n:
                return fn(params, *batched)
            outs = []
            for s in range(0, n, c):
                p = {k: v[s : s + c] for k, v in params.items()}
                outs.append(fn(p, *(b[s : s + c] for b in batched)))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def __call__(self, params: Dict[str, torch.Tensor]) -> GradientEstimate:
        return GradientEstimate(grad=self.expected_gradient(params), per_sample=self.per_sample_gradients(params))
