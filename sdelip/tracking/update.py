"""What the optimizer did with a tracked step: the gradient it stepped with and the realised increment.

A tracked step is measured in :meth:`~sdelip.tracking.tracker.Tracker.backward`, before the
optimizer runs. What happens between the backward and the update is only known at
``optimizer.step()``, so the tracker holds the step's row as a :class:`PendingStep` and
finishes it in the optimizer's step hooks:

- **pre-hook** — the gradient the optimizer is about to use is compared with the tracked
  one (:func:`gradient_edit`). Gradient clipping (``clip_grad_norm_``), ``GradScaler.unscale_``
  or a manual rescaling multiply every gradient by one scalar c, known at the step; any
  other edit (``clip_grad_value_``, a per-parameter change) is named. The weights before
  the update are kept.
- **post-hook** — the update Δ = θ_after − θ_before actually applied gives the realised
  increment of each layer's operator norm (docs/theory.md §15, the expansion of σ1):

      σ1(θ + Δ) − σ1(θ) = u1ᵀΔv1 + ½ vec(Δ)ᵀ H vec(Δ) + O(‖Δ‖³),

  recorded per unit of SDE time, as ``realised_drift = u1ᵀΔv1/(ησ1)`` (to be set against
  the drift μ) and ``realised_curvature = ½Q(Δ)/(ησ1)`` (against κ + the step curvature).
  These are exact whatever the optimizer does (schedules, clipping, decoupled decay,
  unknown optimizers); the row is written then.

A step whose ``optimizer.step()`` never came (a ``GradScaler`` skipping an overflow) is
written at the next backward or at :meth:`~sdelip.tracking.tracker.Tracker.close` with no
realised increment; one that did not step is flagged as not modelled.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import attrs
import torch

from ..core.increments import realised_increment

__all__ = ["PendingStep", "GradientEdit", "gradient_edit", "realised_increments", "realised_network"]

#: Relative tolerance of "the optimizer stepped with c times the tracked gradient".
EDIT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@attrs.frozen
class GradientEdit:
    """How the gradient the optimizer stepped with relates to the tracked one.

    Attributes:
        scale: c with grad_used = c · grad_tracked for every tracked weight (1.0 when
            unchanged), or NaN when no single scalar relates them.
        note: what was found, for the record (None when unchanged).
    """

    scale: float
    note: Optional[str] = None

    @property
    def unchanged(self) -> bool:
        return self.note is None

    @property
    def uniform(self) -> bool:
        return math.isfinite(self.scale)


def gradient_edit(tracked: Mapping[str, torch.Tensor], used: Mapping[str, Optional[torch.Tensor]]) -> GradientEdit:
    """Compare the tracked gradients with those the optimizer steps with (layer name → tensor).

    Exact equality is the common case (nothing between ``tracker.backward`` and
    ``optimizer.step()`` touched ``.grad``). Otherwise the best scalar c per layer is
    ⟨used, tracked⟩ / ‖tracked‖²; the edit is a uniform rescaling when every layer's
    residual ‖used − c·tracked‖ is below the dtype's tolerance and all layers share c.
    """
    if all(used[k] is not None and torch.equal(tracked[k], used[k]) for k in tracked):
        return GradientEdit(1.0)
    scales, bad = {}, []
    for name, g in tracked.items():
        u = used[name]
        if u is None:
            bad.append(f"{name!r} has no gradient at the step")
            continue
        g64, u64 = g.double(), u.double()
        gg = float((g64 * g64).sum())
        if gg == 0.0:
            if float(u64.abs().max()) != 0.0:
                bad.append(f"{name!r}: tracked gradient 0, stepped with a non-zero one")
            continue
        c = float((u64 * g64).sum()) / gg
        rtol = EDIT_RTOL.get(g.dtype, 1e-3)
        resid = float((u64 - c * g64).norm())
        if resid > rtol * max(float(u64.norm()), abs(c) * math.sqrt(gg)) + 1e-300:
            bad.append(f"{name!r}: not a multiple of the tracked gradient (relative residual "
                       f"{resid / max(float(u64.norm()), 1e-300):.3g})")
            continue
        scales[name] = c
    if bad:
        return GradientEdit(math.nan, "the optimizer stepped with a gradient edited after tracker.backward: "
                                      + "; ".join(bad[:3]) + (" …" if len(bad) > 3 else ""))
    values = list(scales.values())
    if not values:
        return GradientEdit(1.0)
    c0 = values[0]
    rtol = max(EDIT_RTOL.get(g.dtype, 1e-3) for g in tracked.values())
    if any(abs(c - c0) > rtol * max(abs(c0), 1e-300) for c in values):
        spread = ", ".join(f"{k}: {v:.6g}" for k, v in list(scales.items())[:4])
        return GradientEdit(math.nan, "the optimizer stepped with gradients rescaled by different factors per "
                                      f"layer ({spread}), e.g. a per-parameter clip")
    if abs(c0 - 1.0) <= rtol:
        return GradientEdit(1.0)
    return GradientEdit(c0, f"the optimizer stepped with the tracked gradient times c = {c0:.6g} (gradient clipping "
                            "or scaling between tracker.backward and optimizer.step())")


@attrs.define
class PendingStep:
    """A tracked step measured in the backward, finished when the optimizer steps.

    Attributes:
        step, lr: the step index and its η.
        record: the row as measured in the backward (a :class:`~sdelip.record.StepRecord`).
        decomps: layer name → the decomposition of its weight matrix before the update.
        grads: layer name → the gradient that was tracked (the parameter's shape), or None
            when the optimizer is not observed.
        recompute: called with the :class:`GradientEdit` found at the step, it returns the
            record's terms for the gradient actually used, or None when they cannot be
            modelled (then ``note`` says why).
        before: layer name → the weight matrix just before the update (set by the pre-hook).
        edit: the :class:`GradientEdit` found by the pre-hook.
    """

    step: int
    lr: float
    record: object
    decomps: dict
    grads: Optional[dict]
    recompute: Optional[object] = None
    before: Optional[dict] = None
    edit: Optional[GradientEdit] = None
    modelled: bool = True
    note: Optional[str] = None


def realised_increments(layers, decomps: Mapping, before: Mapping[str, torch.Tensor], lr: float) -> dict:
    """Layer name → (realised_drift, realised_curvature) of the update the optimizer applied.

    With Δ = θ_after − θ_before (the layer's weight matrix), u1, v1, σ1 and H of θ_before:
    realised_drift = u1ᵀΔv1 / (ησ1), realised_curvature = ½ vec(Δ)ᵀ H vec(Δ) / (ησ1)
    (docs/theory.md §15; H's quadratic form from Δv1 and Δᵀu1, Lemma 13).
    """
    out = {}
    for layer in layers:
        d = decomps[layer.name]
        dtype = d.u1.dtype
        delta = layer.matrix().detach().to(dtype) - before[layer.name].to(dtype)
        inc = realised_increment(d, delta)
        s1 = float(d.sigma1)
        out[layer.name] = (float(inc.first) / (lr * s1), float(inc.half_curvature) / (lr * s1))
    return out


def realised_network(layers, realised: Mapping, lr: float) -> dict:
    """The network's realised increments (relative change of K per unit time, to second order).

    A weight applied c times contributes σ1^c: with a = u1ᵀΔv1/σ1 and b = ½Q(Δ)/σ1, the
    relative change of σ1^c is c·a + c·b + ½c(c − 1)·a² (the same expansion as the step
    curvature of :func:`sdelip.core.formulas.repeated_use_terms`).
    """
    drift = curvature = 0.0
    for layer in layers:
        rd, rc = realised[layer.name]
        c = int(layer.uses)
        drift += c * rd
        curvature += c * rc + 0.5 * c * (c - 1) * lr * rd * rd
    return {"realised_drift_Z": drift, "realised_curvature_Z": curvature}
