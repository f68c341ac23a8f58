"""The per-step measurement pipeline: decompositions, Thm 14 terms per layer, the network record row.

Given the tracked layers, their per-sample statistics from an engine (docs/theory.md §8) and
the step's η and weight decays, a tracked step is three pure steps:

1. :func:`decompose_layers` — σ1, u1, v1, the gap and the Hessian's forms of every weight
   matrix (Lemma 12–13, :func:`sdelip.core.decompositions.decompose_layer`);
2. :func:`layer_terms_from_statistics` — μ, κ (with the Prop 6 split), ‖λ‖² and the step
   curvature per layer (Thm 14), checked finite;
3. :func:`step_record` — the Thm 15 network sums (a weight applied c times as σ1^c,
   :func:`sdelip.core.formulas.repeated_use_terms`) and the record row, whose columns come
   from :data:`sdelip.core.catalogue.TERMS`.

:class:`sdelip.tracking.tracker.Tracker` runs them on every tracked step.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .._checks import NonFiniteError, check_finite
from ..core.amortised import AmortisedGeometry
from ..core.decompositions import decompose_layer
from ..core.formulas import LayerTerms, network_terms, repeated_use_terms, terms_from_projections
from ..record import StepRecord
from ..core.catalogue import TERMS, network_columns

__all__ = ["decompose_layers", "layer_terms_from_statistics", "update_terms_from_statistics", "step_record",
           "check_terms"]


#: The routes that reuse the previous tracked step's decomposition (:mod:`sdelip.core.amortised`).
AMORTISED_ROUTES = ("amortised", "auto")


def decompose_layers(layers: Sequence, method: str, gap_tol: float, on_degenerate: str, step: int,
                     state: "AmortisedGeometry | None" = None) -> dict:
    """Layer name → the decomposition of its weight matrix (:func:`sdelip.core.decompositions.decompose_layer`).

    The routes ``"amortised"`` and ``"auto"`` go through ``state``, the run's
    :class:`~sdelip.core.amortised.AmortisedGeometry` (each layer's previous eigenbasis, the a
    posteriori bounds and the fall-back counters); a fresh one when None (every layer then
    starts with the exact route).
    """
    if method in AMORTISED_ROUTES and state is None:
        state = AmortisedGeometry()
    decomps = {}
    for layer in layers:
        W = layer.matrix().detach()
        if W.dtype in (torch.float16, torch.bfloat16):  # no eigensolvers in half precision
            W = W.float()
        elif W.data_ptr() == layer.weight.data_ptr():
            # a decomposition may keep θ (the Gram route does): a copy, not a view of the parameter that
            # optimizer.step() updates in place before the step's realised increment is measured
            W = W.clone()
        check_finite(W, "the weight matrix", layer.name, step)
        if method in AMORTISED_ROUTES:
            decomps[layer.name] = state.decompose(W, method, gap_tol, on_degenerate, name=layer.name, step=step)
        else:
            decomps[layer.name] = decompose_layer(W, method, gap_tol, on_degenerate, name=layer.name, step=step)
    return decomps


def layer_terms_from_statistics(layers: Sequence, decomps: Mapping, stats: Mapping, lr: float,
                                weight_decays: Mapping[str, float], split: bool, extra_noise_var: float,
                                step: int) -> dict:
    """Layer name → its :class:`~sdelip.core.formulas.LayerTerms` (Thm 14) from the per-sample statistics."""
    terms: dict[str, LayerTerms] = {}
    for layer in layers:
        st = stats[layer.name]
        noise_var = st.noise_var() if split else None
        tt = terms_from_projections(decomps[layer.name], st.Gv, st.Gtu, lr, noise_var=noise_var,
                                    weight_decay=weight_decays[layer.name], extra_noise_var=extra_noise_var,
                                    diffusion_split=layer.uses > 1)
        check_terms(tt, layer.name, step)
        terms[layer.name] = tt
    return terms


def update_terms_from_statistics(layers: Sequence, decomps: Mapping, stats: Mapping, models: Mapping, lr: float,
                                 split: bool, extra_noise_var: float, step: int) -> dict:
    """Layer name → its Thm 14 terms for an optimizer's update Δ = −η·P(ḡ + ξ) (docs/theory.md §15).

    ``models[name]`` is the layer's :class:`~sdelip.optim.UpdateModel` as weight matrices:
    ``direction`` P (the update direction at the mini-batch gradient, Δ = −ηP exactly) and
    ``noise_scale`` S = ∂P/∂g (a float, or an (m, n) matrix whose projections the engine
    applied: ``stats[name].scale``). The per-sample directions

        q_i = P + S∘(g_i − ḡ)

    have mean P and the optimizer's linearised noise S∘ξ_i, so the one terms formula
    gives μ = −u1ᵀPv1/σ1, κ and ‖λ‖² of the noise S∘ξ, the Prop 6 split with diag(SΣ̂S)
    = S²∘diag Σ̂, and the step curvature (η/2σ1)(PᵀHP − tr(H SΣ̂S)). Weight decay (coupled
    or decoupled) is part of P. For plain SGD (P = ḡ + λθ, S = 1) this is
    :func:`layer_terms_from_statistics`.
    """
    terms: dict[str, LayerTerms] = {}
    for layer in layers:
        st, d, um = stats[layer.name], decomps[layer.name], models[layer.name]
        S = um.noise_scale
        if isinstance(S, torch.Tensor):
            if getattr(st, "scale", None) is None:
                raise RuntimeError(f"layer {layer.name!r} at step {step}: the optimizer's noise scale is elementwise "
                                   "but the engine returned the statistics of the unscaled gradients")
            Gv, Gtu = st.Gv, st.Gtu
            noise_var = st.noise_var() * S.square() if split else None
            if extra_noise_var:
                raise ValueError(f"step {step}: an isotropic gradient perturbation (extra_noise_var) is modelled for "
                                 "optimizers with a scalar noise scale only (the SGD family), not "
                                 "for an elementwise preconditioner")
            extra = 0.0
        else:
            s = float(S)
            Gv, Gtu = st.Gv * s, st.Gtu * s
            noise_var = st.noise_var() * (s * s) if split else None
            extra = extra_noise_var * s * s
        P = um.direction.to(d.u1.dtype)
        Gv = Gv - Gv.mean(0) + P @ d.v1
        Gtu = Gtu - Gtu.mean(0) + P.mT @ d.u1
        tt = terms_from_projections(d, Gv, Gtu, lr, noise_var=noise_var, weight_decay=0.0, extra_noise_var=extra,
                                    diffusion_split=layer.uses > 1)
        check_terms(tt, layer.name, step)
        terms[layer.name] = tt
    return terms


def check_terms(tt: LayerTerms, name: str, step: int) -> None:
    """Raise :class:`~sdelip._checks.NonFiniteError` naming the term, layer and step if one is NaN/Inf."""
    for key, v in tt.as_dict().items():
        if isinstance(v, float) and not np.isfinite(v):
            raise NonFiniteError(f"the term {key} of layer {name!r} at step {step} is {v}")


def step_record(layers: Sequence, terms: Mapping, losses: torch.Tensor, step: int, t: float, M: int, lr: float,
                extra_noise_var: float) -> StepRecord:
    """The record row of a tracked step: per-layer columns and the Thm 15 network sums."""
    net = network_terms([repeated_use_terms(terms[l.name], l.uses, lr, extra_noise_var) for l in layers])
    layer_rows = {}
    for layer in layers:
        q = terms[layer.name].as_dict()
        layer_rows[layer.name] = {t_.column: q[t_.name] for t_ in TERMS}
        layer_rows[layer.name]["degenerate"] = bool(q["degenerate"])
    network = {c: getattr(net, c, None) for c in network_columns()}
    loss = float(losses.detach().double().mean())
    return StepRecord(
        step=step, t=float(t), lr=lr, loss=loss, batch_size=M, layers=layer_rows, network=network,
        degenerate=any(r["degenerate"] for r in layer_rows.values()),
    )
