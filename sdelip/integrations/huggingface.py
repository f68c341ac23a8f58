"""Hugging Face models and batches: per-sample losses, the SDE adapter, and a tracking ``Trainer``.

**Per-sample losses.** A Hugging Face model returns a ``ModelOutput`` (a dict with
``logits``) and its loader yields dict batches (``input_ids``, ``attention_mask``,
``labels``, …). The tracker needs one loss per sample; :func:`per_sample_loss` forms it
from the output and the batch::

    out = model(**batch)
    losses = per_sample_loss(out, batch, model)   # (M,)
    tracker.backward(losses)                      # in place of out.loss.backward()

- sequence classification (logits (M, C)): cross-entropy per sample (squared error for a
  regression head, ``num_labels == 1`` with float labels);
- token-level heads (logits (M, T, V)): cross-entropy per token, ``labels == -100``
  ignored, shifted by one for causal language models (``model.config.is_decoder`` or a
  ``…ForCausalLM``/``…LMHeadModel`` class; ``causal=`` overrides). Per sample,
  ``weighting="batch"`` (default) gives ℓ_i = Σ_t ℓ_it / n̄ with n̄ the mean number of
  labelled tokens per sample of the batch, so that mean_i ℓ_i is exactly the model's own
  token-averaged loss (the loss Hugging Face optimises); ``weighting="sample"`` gives each
  sample's own token mean (equal to it without padding).

**The SDE.** :func:`hf_model_and_data` turns a Hugging Face model and a loader of dict
batches into the (model, loader of (inputs, targets), ``loss_fn``) that
:class:`~sdelip.sde.ParameterSDE` and :class:`~sdelip.sde.LipschitzSDE` take:
``ParameterSDE(model, loader, lr=...)`` calls it itself for a loader of dict batches.

**The Trainer.** :class:`SdelipTrainer` is a ``transformers.Trainer`` whose training step
runs the tracker's backward of :func:`per_sample_loss` (or of its own ``per_sample_loss``
method, override it for another loss): ``SdelipTrainer(model, args, train_dataset=...,
sdelip_record="runs/gpt2.db").train()``. The Trainer's defaults are tracked as they are:
AdamW (fused or not), the linear schedule (η read at every step), gradient clipping at
``max_grad_norm`` (a clipped Adam step is recorded and flagged ``update_modelled =
False``, since Adam's update is not a uniform rescaling of its gradient, sdelip.optim).
Refused by name: ``fp16``/``bf16`` (:class:`~sdelip.errors.UnsupportedPrecisionError`),
``gradient_accumulation_steps > 1`` and several processes
(:class:`~sdelip.errors.IntegrationError`). Checkpoints hold the tracker's state
(``sdelip_tracker.pt``); ``train(resume_from_checkpoint=...)`` truncates the record to the
checkpoint's step and continues it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import IntegrationError, UnsupportedPrecisionError
from .batches import HFModelAdapter, hf_model_and_data, is_causal_lm, is_dict_data, logits_of, per_sample_loss

__all__ = ["per_sample_loss", "logits_of", "is_causal_lm", "HFModelAdapter", "hf_model_and_data", "is_dict_data",
           "SdelipTrainer", "TrackingTrainerMixin"]


# -------------------------------------------------------------------------------------------------
# the Trainer

try:
    import transformers as _transformers
except ImportError:  # pragma: no cover - the optional dependency
    _transformers = None


class TrackingTrainerMixin:
    """The tracking of :class:`SdelipTrainer`, to mix into another ``transformers.Trainer`` subclass.

    Keywords (taken before the Trainer's own): ``sdelip_record`` (the record: a path, a
    :class:`~sdelip.tracking.options.RecordOptions` or None), ``sdelip_log`` (``"network"``,
    ``"all"`` or None: the terms passed to ``Trainer.log``, i.e. to every ``report_to``
    integration), ``sdelip_tracker`` (a dict of :class:`~sdelip.tracking.tracker.Tracker`
    keywords). The tracker is built at the first training step (the optimizer exists
    then) and closed at the end of ``train``; it stays readable as :attr:`tracker`.
    """

    def __init__(self, *args, sdelip_record=None, sdelip_log: Optional[str] = "network",
                 sdelip_tracker: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sdelip_record = sdelip_record
        self.sdelip_log = sdelip_log
        self.sdelip_tracker_kwargs = dict(sdelip_tracker or {})
        self.tracker = None
        self._sdelip_state = None  # the tracker state of the checkpoint ``train`` resumes from
        self._sdelip_logged = -1
        self._check_tracked_args()

    def _check_tracked_args(self) -> None:
        args = self.args
        for flag in ("fp16", "bf16", "fp16_full_eval", "half_precision_backend"):
            if flag in ("fp16", "bf16") and getattr(args, flag, False):
                raise UnsupportedPrecisionError(
                    f"TrainingArguments({flag}=True) is not tracked: mixed precision changes the update the tracker "
                    "measures (fp16 loss scaling rescales the losses and skips updates; bf16 autocast would take the "
                    "per-sample statistics in a 7-bit mantissa); train the tracked run in float32")
        if args.gradient_accumulation_steps != 1:
            raise IntegrationError(
                f"TrainingArguments(gradient_accumulation_steps={args.gradient_accumulation_steps}) is not tracked: "
                "the tracker measures one backward per optimizer step; use a larger per-device batch")
        if args.world_size != 1 or args.n_gpu > 1:
            raise IntegrationError("SdelipTrainer runs in one process on one device; for DDP use "
                                   "sdelip.integrations.distributed.DistributedTracker in a plain loop")

    def per_sample_loss(self, model, outputs, inputs) -> torch.Tensor:
        """The (M,) per-sample losses of the step (default :func:`per_sample_loss`); override for another loss."""
        return per_sample_loss(outputs, inputs, _unwrap(model))

    def _sdelip_start(self, model):
        from ..tracking.tracker import Tracker

        import attrs

        from ..tracking.options import RecordOptions

        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer
        record, state = RecordOptions.of(self.sdelip_record), self._sdelip_state
        if state is not None and record.path is not None:
            record = attrs.evolve(record, mode="append")
        self.tracker = Tracker(_unwrap(model), opt, record, **self.sdelip_tracker_kwargs)
        if state is not None:
            try:
                self.tracker.load_state_dict(state)  # truncates the record to the checkpoint's step
                self.tracker._note_resumed(self.tracker.step)
            except BaseException:
                self.tracker.close()
                raise
            self._sdelip_state = None
        return self.tracker

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        """The Trainer's checkpoint, plus the tracker's state in it (``sdelip_tracker.pt``)."""
        out = super()._save_checkpoint(model, trial, *args, **kwargs)
        if self.tracker is not None and self.args.should_save:
            import os

            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            torch.save(self.tracker.state_dict(), os.path.join(folder, TRACKER_STATE))
        return out

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        tracker = self.tracker if self.tracker is not None and not self.tracker._closed else self._sdelip_start(model)
        self._sdelip_log_last()
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        losses = self.per_sample_loss(model, outputs, inputs)
        tracker.backward(losses)
        return losses.detach().mean()

    def _sdelip_log_last(self) -> None:
        rec = None if self.tracker is None else self.tracker.last
        if self.sdelip_log is None or rec is None or rec.step <= self._sdelip_logged:
            return
        from .metrics import step_metrics

        self._sdelip_logged = rec.step
        self.log(step_metrics(rec, self.sdelip_log))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; resuming from a checkpoint continues the record from the checkpoint's step."""
        import os

        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            folder = resume_from_checkpoint
            if folder is True:
                from transformers.trainer_utils import get_last_checkpoint

                folder = get_last_checkpoint(self.args.output_dir)
            path = os.path.join(str(folder), TRACKER_STATE)
            if not os.path.exists(path):
                raise IntegrationError(f"the checkpoint {str(folder)!r} holds no tracker state ({TRACKER_STATE}): it "
                                       "was not written by a tracking Trainer, and the record cannot be continued")
            self._sdelip_state = torch.load(path, weights_only=True)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self.tracker is not None:
                self.tracker.close()
                self._sdelip_log_last()


#: The file of the tracker's state in a Trainer checkpoint folder.
TRACKER_STATE = "sdelip_tracker.pt"


def _unwrap(model):
    return getattr(model, "module", model)


if _transformers is not None:
    class SdelipTrainer(TrackingTrainerMixin, _transformers.Trainer):
        """A ``transformers.Trainer`` that tracks its training (see :class:`TrackingTrainerMixin` for the keywords)."""
else:  # pragma: no cover
    class SdelipTrainer:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError("SdelipTrainer needs transformers: pip install 'sdelip[integrations]'")
