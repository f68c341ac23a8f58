"""Tracking a data-parallel run (``torch.distributed``, DDP, ``torchrun``) exactly.

Under data parallelism each of the W processes (ranks) sees its own share of the global
mini-batch of M = Σ_r M_r samples. The Thm 14 terms are functions of the per-sample
statistics of the *global* batch (docs/theory.md §8): the projections g_i v1 and g_iᵀ u1
of every sample, Σ_i g_i and Σ_i g_i ∘ g_i. :class:`DistributedTracker` computes every
rank's statistics with the ordinary engine on its own samples, then combines them: the
factored sums Σ g_i and Σ g_i ∘ g_i are all-reduced, the per-sample projections and the
per-sample losses are gathered (rank order: rank 0's samples first), and the gradients
are averaged over the ranks, as DDP does. Every rank then holds the statistics of the
global batch and computes the same terms; rank 0 writes the record, which equals the
record of one process training on the concatenated global batch (tested to 1e-10 in
float64 with gloo on CPU).

Usage (one process per rank, e.g. ``torchrun --nproc_per_node=2 train.py``)::

    torch.distributed.init_process_group("gloo")          # "nccl" on GPUs
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    tracker = DistributedTracker(ddp, opt, record="runs/ddp.db")   # written by rank 0 only
    for x, y in loader:                                    # a DistributedSampler's share
        opt.zero_grad()
        tracker.backward(F.cross_entropy(ddp(x), y, reduction="none"))
        opt.step()
    tracker.close()

The gradient synchronisation is done by the tracker, not by DDP's reducer: the tracker
switches the reducer off (``require_backward_grad_sync = False``, what ``ddp.no_sync()``
does) and all-reduces every gradient itself after each backward, so that every engine
sees the rank's own gradient. A model not wrapped in DDP works the same way (its
parameters must be equal on every rank: broadcast them first, as DDP does).

Limits, each refused by name (:class:`~sdelip.errors.DistributedTrackingError`): the
coupled engine (BatchNorm with batch statistics: its batch is the rank's, not the global
one); ranks with different batch sizes in one step are fine, but each tracked step needs
M_r ≥ 2 on every rank when the optimizer is elementwise (Adam, RMSprop, Adagrad).
DDP's buffer broadcast is off with the reducer: models whose buffers change in training
(BatchNorm running statistics) are refused.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..core.statistics import LayerStatistics
from ..engines import Engine
from ..errors import DistributedTrackingError
from ..tracking.options import RecordOptions
from ..tracking.tracker import Tracker

__all__ = ["DistributedTracker", "DistributedEngine", "unwrap_ddp"]


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class DistributedEngine(Engine):
    """An engine that combines the per-sample statistics of every rank (module docstring).

    Wraps the ordinary engine of the rank (``inner``): the backward of the rank's own
    losses, then the all-reduce of Σ g_i and Σ g_i ∘ g_i, the all-gather of the per-sample
    projections and the average of the gradients over the ranks.
    """

    def __init__(self, inner: Engine, group=None):
        self.inner = inner
        self.group = group
        self.name = inner.name
        self.needs_batch = inner.needs_batch
        self.handles_coupling = inner.handles_coupling
        self.model, self.layers, self.split, self.chunk_bytes = inner.model, inner.layers, inner.split, inner.chunk_bytes
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        #: the per-sample losses of the global batch of the last backward (rank order)
        self.global_losses: Optional[torch.Tensor] = None

    # -- delegation ---------------------------------------------------------------------------
    def attach(self) -> None:
        self.inner.attach()

    def detach(self) -> None:
        self.inner.detach()

    def arm(self, capture: bool) -> None:
        self.inner.arm(capture)

    def check_applicable(self) -> None:
        self.inner.check_applicable()

    # -- collectives --------------------------------------------------------------------------
    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate a (M_r, …) tensor of every rank along dim 0, in rank order (sizes may differ)."""
        x = x.contiguous()
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s) for s in sizes]
        top = max(sizes)
        pad = x.new_zeros((top, *x.shape[1:]))
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad, group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def _average_gradients(self) -> None:
        """p.grad ← the mean over the ranks (what DDP's reducer does), for every parameter of the model."""
        for p in self.inner.model.parameters():
            if not p.requires_grad:
                continue
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            g = g.to_dense() if g.is_sparse else g
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self.group)
            g.div_(self.world)
            if p.grad is None or p.grad.is_sparse:
                p.grad = g

    def _losses(self, losses: torch.Tensor) -> None:
        self.global_losses = self._gather_rows(losses.detach())

    # -- the step ---------------------------------------------------------------------------
    def plain_backward(self, losses: torch.Tensor) -> None:
        M_r = losses.shape[0]
        self._losses(losses)
        M = self.global_losses.shape[0]
        # the gradient of the global mean: Σ_r (M_r/M) ∇ mean_r; with equal shares the mean over ranks
        (losses.mean() * (M_r * self.world / M)).backward()
        self._average_gradients()

    def backward(self, losses, directions, batch=None, step=None, scale=None) -> dict[str, LayerStatistics]:
        M_r = int(losses.shape[0])
        self._losses(losses)
        M = int(self.global_losses.shape[0])
        if M_r * self.world != M:
            raise DistributedTrackingError(
                f"step {step}: the ranks' mini-batches differ in size ({M_r} samples on rank {self.rank}, {M} in "
                "all): the tracked gradient is the mean over the global batch, which DDP's average over ranks "
                "equals only for equal shares; use DistributedSampler(drop_last=True) and "
                "DataLoader(drop_last=True)")
        wrapped = None
        if scale is not None:
            if M_r < 2:
                raise DistributedTrackingError(
                    f"step {step}: an elementwise optimizer needs the noise of every rank's share, and rank "
                    f"{self.rank} has M_r = {M_r} sample; use at least 2 samples per rank")

            def wrapped(name, mean_grad, noise_var):  # the optimizer's S of the *global* ḡ and diag Σ̂
                s_g = mean_grad * M_r
                s_sq = noise_var * (M_r * (M_r - 1)) + s_g * s_g / M_r
                s_g, s_sq = self._sum(s_g), self._sum(s_sq)
                st = LayerStatistics(M, s_g.new_zeros(0), s_g.new_zeros(0), s_g, s_sq)
                return scale(name, st.mean(), st.noise_var())
        stats = self.inner.backward(losses, directions, batch=batch, step=step, scale=wrapped)
        out = {}
        for layer in self.layers:  # the same order on every rank
            st = stats[layer.name]
            out[layer.name] = LayerStatistics(
                M, self._gather_rows(st.Gv), self._gather_rows(st.Gtu),
                None if st.sum_g is None else self._sum(st.sum_g),
                None if st.sum_sq is None else self._sum(st.sum_sq), st.scale)
        self._average_gradients()
        return out


class DistributedTracker(Tracker):
    """A :class:`~sdelip.tracking.tracker.Tracker` of a data-parallel run; rank 0 writes the record.

    Args:
        model: the ``DistributedDataParallel`` model (or a plain module whose gradients
            the tracker averages over the ranks); the tracked layers are those of the
            module inside (names without ``module.``).
        optimizer, record, **kwargs: as for :class:`~sdelip.tracking.tracker.Tracker`;
            ``record`` is written by rank 0 only (the other ranks keep no record).
        group: the process group (default: the world).

    Every rank must call :meth:`backward` and ``optimizer.step()`` at every step, with its
    own share of the global batch (equal shares). The record's rows are those of one
    process training on the global batch (rank 0's samples first): ``loss`` and
    ``batch_size`` are the global batch's.
    """

    def __init__(self, model: nn.Module, optimizer=None, record=None, *, group=None, **kwargs):
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedTrackingError(
                "DistributedTracker needs an initialised process group: torch.distributed.init_process_group(...) "
                "first (torchrun sets the environment it reads)")
        self.ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        inner = unwrap_ddp(model)
        rank = dist.get_rank(group)
        if rank != 0:
            record = None
        else:
            record = RecordOptions.of(record)
            meta = dict(record.metadata or {})
            meta.setdefault("world_size", dist.get_world_size(group))
            import attrs
            record = attrs.evolve(record, metadata=meta)
        super().__init__(inner, optimizer, record, **kwargs)
        try:
            if self.engine.handles_coupling:
                raise DistributedTrackingError(
                    f"the {self.engine.name} engine differentiates through statistics of the rank's own batch "
                    "(BatchNorm with batch statistics), which differ from those of the global batch; "
                    "DistributedTracker supports the factored and materialised engines (BatchNorm in eval mode, "
                    "or LayerNorm/GroupNorm)")
            if any(b.numel() and not b.dtype == torch.bool for _, b in inner.named_buffers()
                   if _changes_in_training(inner, _)):
                raise DistributedTrackingError("the model has running statistics (BatchNorm buffers), which DDP "
                                               "broadcasts and the tracker's gradient synchronisation does not")
        except BaseException:
            self.close()
            raise
        self.engine = DistributedEngine(self.engine, group)
        self.group = group
        self.rank = rank
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = False  # the tracker averages the gradients itself

    def backward(self, losses: torch.Tensor, batch=None):
        rec = super().backward(losses, batch=batch)
        M = int(self.engine.global_losses.shape[0])
        if self._metadata.get("batch_size") != M and rec is not None:
            self._metadata["batch_size"] = M
            if self.writer is not None:
                self.writer.update_metadata({"batch_size": M})
        return rec

    def _step_record(self, terms, losses, step, M, lr, t=None):
        g = self.engine.global_losses
        return super()._step_record(terms, g, step, int(g.shape[0]), lr, t)

    def close(self) -> None:
        super().close()
        ddp = getattr(self, "ddp", None)
        if ddp is not None:
            ddp.require_backward_grad_sync = True


def _changes_in_training(model: nn.Module, buffer_name: str) -> bool:
    return buffer_name.endswith(("running_mean", "running_var"))
