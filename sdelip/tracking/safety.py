"""Safety checks of :class:`sdelip.tracking.tracker.Tracker` around the step: continuation, overflow, accumulation.

Kept apart from the tracker's measurement code: what a continued record must share with
the run that wrote it (:func:`check_continuation`), how an overflow of the tracker's own
sums is explained (:func:`explain_overflow`), and the refusal of gradient accumulation
(:class:`GradientAccumulationError`).
"""

from __future__ import annotations

import torch

from .._checks import NonFiniteError
from ..record import record_steps
from .resume import here_and_there, option_changes
from ..errors import GradientAccumulationError, SmallBatchWarning  # noqa: F401  (defined there, re-exported)

__all__ = ["SmallBatchWarning", "GradientAccumulationError", "check_continuation", "explain_overflow",
           "accumulation_message", "check_one_backward_per_step"]


def accumulation_message(step: int) -> str:
    """Why a second backward without ``optimizer.step()`` is refused, and what to do instead."""
    return (
        f"tracker.backward was called again at step {step} without optimizer.step() after the previous "
        "call: gradient accumulation (several backward passes per optimizer step) is not supported, since "
        "the tracker counts every backward as one SGD step of the SDE time (Def 4) and measures the noise "
        "of its mini-batch. Run all the samples of the update through one forward pass and pass their "
        "per-sample losses in one call, tracker.backward(losses), with optimizer.step() after each call; "
        "when one update's batch does not fit in memory, track a run with a smaller batch instead"
    )


def check_one_backward_per_step(tracker, step: int) -> None:
    """One :meth:`Tracker.backward` per ``optimizer.step()``: gradient accumulation is refused.

    The SDE time advances by η per backward (one SGD update, Def 4). Several backward
    calls per optimizer step (gradient accumulation over micro-batches) would count
    each micro-batch as an SGD step and measure the noise of a micro-batch, not of
    the update actually applied. Accumulation is a backward on top of gradients that
    were not zeroed: a backward after ``zero_grad()`` without a step in between (a
    ``GradScaler`` skipping ``optimizer.step()`` on an overflow) is allowed.

    Raises:
        GradientAccumulationError: a second backward on gradients that were not zeroed.
    """
    if tracker.optimizer is None:
        return
    if tracker.optim.backwards_since_step >= 1:
        grads = [l.weight.grad for l in tracker.layers if l.weight.is_leaf]
        if any(g is not None and bool(g.detach().ne(0).any()) for g in grads):
            raise GradientAccumulationError(accumulation_message(step))


def check_continuation(tracker, start_step: int) -> None:
    """``Tracker(start_step=k)`` on an existing record continues that run: same options, one η, no gap.

    Raises:
        ValueError: the record was written with other tracker options (each named with
            both values), with another learning rate (t = kη needs one η), or ends
            before the last tracked step preceding ``start_step`` (a gap).
    """
    meta = tracker.writer.metadata()
    where = f"Tracker(start_step={start_step}) on the record {str(tracker.record_path)!r}"
    rows = record_steps(tracker.record_path)
    if not rows["rows"]:
        return
    now = {**tracker._options(), "lr": tracker._hyperparameters(start_step)[0]}
    now.pop("uses", None)
    changed = here_and_there(option_changes(meta, now), "record")
    lrs = rows["lrs"]
    if lrs != [now["lr"]] and "lr" not in [c.split("=")[0] for c in changed]:
        changed.append(f"lr={now['lr']!r} here, lr={lrs if len(lrs) > 1 else lrs[0]!r} in the record's rows")
    if changed:
        raise ValueError(
            f"{where}: the record was written with other options: " + "; ".join(changed) + ". A continued run "
            "keeps the record's configuration (start_step sets t = start_step·η for one constant η); write a "
            "new record for a new configuration"
        )
    last = rows["last_step"]
    expected = next((s for s in range(start_step - 1, -1, -1) if tracker.schedule(s)), None)
    if expected is not None and last < expected:
        raise ValueError(
            f"{where}: the record ends at step {last}, but this schedule tracks step {expected} before "
            f"{start_step}: steps {last + 1}..{start_step - 1} would be missing. Continue from step "
            f"{last + 1} (or from a checkpoint, Tracker.resume)"
        )


def explain_overflow(exc: NonFiniteError, losses: torch.Tensor, dtype: torch.dtype) -> NonFiniteError:
    """Say when a non-finite statistic is an overflow of the tracker's own sum of squares.

    Σ g_i² squares the per-sample gradients: in float32 it overflows (max ≈ 3.4e38) once
    a per-sample gradient entry exceeds ≈ 1.8e19, although the gradients, the losses and
    the plain backward are all finite (e.g. inputs scaled by 1e20).
    """
    if "Σ g_i²" not in str(exc) or dtype == torch.float64:
        return exc
    big = float(losses.detach().abs().max())
    fmax = torch.finfo(dtype).max
    text = str(exc).replace(" (a NaN or Inf gradient flowed back into this layer)", "")
    return NonFiniteError(
        f"{text}. The losses are finite (largest {big:.3g}): most likely the tracker's own sum of squared "
        f"per-sample gradients Σ g_i² overflowed; it exceeds the largest {str(dtype).replace('torch.', '')}"
        f" number ({fmax:.3g}) once a per-sample gradient entry exceeds {fmax ** 0.5:.3g}, while the gradients "
        "and the plain backward can still be finite. Track in float64 (model.double() and double inputs) or "
        "rescale the inputs"
    )
