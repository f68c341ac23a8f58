"""Tracking a Lightning ``LightningModule`` trained with automatic optimization: one callback.

::

    import lightning as L
    from sdelip.integrations.lightning import SdelipCallback

    class Net(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = F.cross_entropy(self(x), y, reduction="none")   # one loss per sample
            return {"losses": losses}          # "loss" (their mean) is added when absent

    trainer = L.Trainer(max_steps=100, callbacks=[SdelipCallback(record="runs/net.db")])
    trainer.fit(Net(), loader)

**The contract.** ``training_step`` returns a dict with the per-sample losses under
``"losses"`` (an (M,) tensor of the loss being optimised, ``reduction="none"``); a
``"loss"`` entry, if given, must be their mean (Lightning logs it), else the callback
adds it. The callback then does the rest:

- **the backward**: it overrides the module's :meth:`LightningModule.backward` hook (the
  documented place to change how the loss is back-propagated) with the tracker's
  :meth:`~sdelip.tracking.tracker.Tracker.backward` of the per-sample losses, which leaves
  the same ``p.grad`` as Lightning's ``loss.backward()``;
- **the optimizer step**: Lightning runs the training step and backward in a closure
  *inside* ``optimizer.step(closure)``, after the optimizer's step pre-hooks; the callback
  has the closure evaluated first, so that the tracker sees the gradient the update uses
  (after Lightning's ``gradient_clip_val`` clipping, which it detects) and the update itself;
- **checkpoints**: the tracker's state is the callback's state in Lightning's checkpoints
  (``state_dict``/``load_state_dict``); ``trainer.fit(..., ckpt_path=...)`` continues the
  record after truncating it to the checkpoint's step, as :meth:`Tracker.restore` does;
- **loggers**: every tracked step's terms go to ``trainer.loggers`` under ``sdelip/``
  (``log="network"``: the network terms; ``"all"``: every column; None: nothing);
  booleans as 0/1;
- **precision**: ``"32-true"`` and ``"64-true"`` are tracked; ``"16-mixed"`` (loss scaling),
  ``"bf16-mixed"`` (autocast: the per-sample statistics and the spectral decompositions
  would be taken in bfloat16) and the other plugins are refused by name
  (:class:`~sdelip.errors.UnsupportedPrecisionError`) at ``fit``.

Also refused by name: manual optimization (use :class:`~sdelip.tracking.tracker.Tracker`
directly, its backward in place of ``self.manual_backward``), ``accumulate_grad_batches``
> 1 (the tracker measures one backward per update), several optimizers, several
processes (see :mod:`sdelip.integrations.distributed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the optional dependency
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError("sdelip.integrations.lightning needs Lightning: pip install 'sdelip[integrations]' "
                          "(or pip install lightning)") from exc

import attrs

from ..errors import IntegrationError, PerSampleLossError, UnsupportedPrecisionError
from ..tracking.options import RecordOptions
from ..tracking.tracker import Tracker
from .metrics import step_metrics

__all__ = ["SdelipCallback", "SUPPORTED_PRECISION", "step_metrics"]

#: Lightning precision settings the callback tracks.
SUPPORTED_PRECISION = ("32-true", "64-true", "32", "64")

class SdelipCallback(pl.Callback):
    """Track the Lipschitz dynamics of a ``LightningModule`` trained with automatic optimization.

    Args:
        record: the tracker's record (a path, a :class:`~sdelip.tracking.options.RecordOptions`
            or None to keep the rows in :attr:`tracker`'s history).
        log: ``"network"`` (default), ``"all"`` or None: which terms go to the trainer's loggers.
        losses_key: the key of the per-sample losses in ``training_step``'s dict.
        **tracker_kwargs: the keywords of :class:`~sdelip.tracking.tracker.Tracker` (``engine``,
            ``schedule``, ``options``, ``runtime``, ``example_input``, ``probe_input``, ...).

    Attributes:
        tracker: the :class:`~sdelip.tracking.tracker.Tracker` (from ``on_train_start`` to the
            end of ``fit``; it stays readable after, closed).
    """

    def __init__(self, record=None, *, log: Optional[str] = "network", losses_key: str = "losses",
                 **tracker_kwargs):
        if log not in (None, "network", "all"):
            raise ValueError(f"log must be 'network', 'all' or None, got {log!r}")
        self.record = record
        self.log = log
        self.losses_key = losses_key
        self.tracker_kwargs = tracker_kwargs
        self.tracker: Optional[Tracker] = None
        self._restored: Optional[dict] = None
        self._losses: Optional[torch.Tensor] = None
        self._undo: list = []
        self._logged_step = -1

    # -- checks and the overrides --------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        precision = str(trainer.precision)
        if precision not in SUPPORTED_PRECISION:
            raise UnsupportedPrecisionError(
                f"Trainer(precision={precision!r}) is not tracked: the tracker measures the update in the weights' "
                "own dtype, and mixed precision changes it (loss scaling with '16-mixed' rescales the losses and "
                "may skip updates; autocast with 'bf16-mixed' would take the per-sample statistics and the "
                "spectral decompositions in a 7-bit mantissa). Use precision='32-true' or '64-true' for the "
                "tracked run")
        if not pl_module.automatic_optimization:
            raise IntegrationError(
                "SdelipCallback tracks automatic optimization; with manual optimization build a Tracker in "
                "on_train_start and call tracker.backward(losses) in place of self.manual_backward(loss)")
        if trainer.accumulate_grad_batches != 1:
            raise IntegrationError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) is not tracked: the tracker "
                "measures one backward per optimizer step (the step's mini-batch); use a larger batch instead")
        if trainer.world_size != 1:
            raise IntegrationError(
                f"SdelipCallback runs in one process (the trainer has {trainer.world_size}); for several processes "
                "use sdelip.integrations.distributed.DistributedTracker in a plain loop (docs/integrations.md)")
        self._override(pl_module)

    def _override(self, pl_module) -> None:
        callback = self
        step_fn = pl_module.training_step

        def training_step(*args, **kwargs):
            out = step_fn(*args, **kwargs)
            return callback._take_losses(out)

        def backward(loss, *args, **kwargs):
            callback._backward(loss)

        for name, fn in (("training_step", training_step), ("backward", backward)):
            had = name in pl_module.__dict__
            old = pl_module.__dict__.get(name)
            object.__setattr__(pl_module, name, fn)
            self._undo.append(lambda n=name, h=had, o=old: (object.__setattr__(pl_module, n, o) if h
                                                            else pl_module.__dict__.pop(n, None)))

    def _take_losses(self, out):
        key = self.losses_key
        if not isinstance(out, Mapping) or key not in out:
            raise PerSampleLossError(
                f"SdelipCallback: training_step must return a dict with the per-sample losses under {key!r} (an (M,) "
                f"tensor, reduction='none'), e.g. return {{{key!r}: F.cross_entropy(logits, y, reduction='none')}}; "
                f"it returned {type(out).__name__}" + (f" with keys {sorted(out)}" if isinstance(out, Mapping) else ""))
        losses = out[key]
        if not isinstance(losses, torch.Tensor) or losses.ndim != 1:
            raise PerSampleLossError(f"training_step's {key!r} must be an (M,) tensor of per-sample losses, got "
                                     f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)}")
        out = dict(out)
        mean = losses.mean()
        if "loss" in out:
            given = out["loss"]
            if not isinstance(given, torch.Tensor) or given.numel() != 1 or \
                    not torch.allclose(given.detach().float(), mean.detach().float(), rtol=1e-5, atol=1e-7):
                raise PerSampleLossError(
                    f"training_step's 'loss' ({float(given) if isinstance(given, torch.Tensor) and given.numel() == 1 else given}) "
                    f"is not the mean of its {key!r} ({float(mean):.6g}): the tracker optimises the mean of the "
                    f"per-sample losses; return {{{key!r}: losses}} alone (the callback adds the mean)")
        out["loss"] = mean
        self._losses = losses
        return out

    def _backward(self, loss) -> None:
        losses, self._losses = self._losses, None
        if losses is None or self.tracker is None:
            raise PerSampleLossError("SdelipCallback: a backward without the training step's per-sample losses "
                                     "(the tracker is built in on_train_start)")
        self.tracker.backward(losses)

    # -- the tracker --------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise IntegrationError(f"SdelipCallback tracks one optimizer, the module configures {len(trainer.optimizers)}")
        opt = trainer.optimizers[0]
        record = RecordOptions.of(self.record)
        state = self._restored
        if state is not None and record.path is not None:
            record = attrs.evolve(record, mode="append")
        self.tracker = Tracker(pl_module, opt, record, **self.tracker_kwargs)
        if state is not None:
            try:
                self.tracker.load_state_dict(state)
                self.tracker._note_resumed(self.tracker.step)
            except BaseException:
                self.tracker.close()
                raise
        self._undo.append(_closure_first(opt))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rec = self.tracker.last if self.tracker is not None else None
        if self.log is None or rec is None or rec.step <= self._logged_step:
            return
        self._logged_step = rec.step
        metrics = step_metrics(rec, self.log)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(rec.step))

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._finish()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._finish()

    def _finish(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        while self._undo:
            self._undo.pop()()

    # -- Lightning checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.tracker is not None:
            return {"tracker": self.tracker.state_dict()}
        return {"tracker": self._restored}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("tracker")


def _closure_first(optimizer: torch.optim.Optimizer):
    """Make ``optimizer.step(closure)`` evaluate the closure before the optimizer's step hooks; returns the undo.

    ``step(closure)`` of the optimizers the tracker models (SGD, Adam, AdamW, RMSprop, Adagrad)
    evaluates the closure once and then updates; evaluated first, the closure's backward
    (and Lightning's clipping after it) come before the step pre-hooks, where the tracker
    reads the gradient the update uses.
    """
    had = "step" in optimizer.__dict__
    old = optimizer.__dict__.get("step")
    inner = optimizer.step

    def step(closure=None, **kwargs):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        out = inner(**kwargs)
        return loss if out is None else out

    optimizer.step = step

    def undo():
        if had:
            optimizer.step = old
        else:
            optimizer.__dict__.pop("step", None)

    return undo
