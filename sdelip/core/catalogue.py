"""Each quantity of the Lipschitz dynamics defined once (Thm 14–15, Prop 6, Assumption 11).

A :class:`Term` names a per-layer quantity by its attribute of
:class:`sdelip.core.formulas.LayerTerms`, its record column, its network aggregate (Thm 15),
how it is shown (symbol, ASCII name for tables, label for plots) and how it scales when a
weight is applied c times (``repeated_use``: the term of the factor σ1^c of K, Prop 8 with
Itô's lemma). The record schema (:mod:`sdelip.record`), the tracker's rows, the SDE systems'
term names and integrable state columns (:mod:`sdelip.sde`), the plot labels and
:func:`sdelip.core.formulas.repeated_use_terms` derive from :data:`TERMS`.

Adding a term: its entry here (with its ``repeated_use`` rule), its field of
:class:`~sdelip.core.formulas.LayerTerms` computed by the one formula
:func:`sdelip.core.formulas.terms_from_projections` from the primitives of
:class:`~sdelip.core.decompositions.Decomposition` (every route, batched SDE trajectories
included, gets it from there), its network aggregate in :func:`sdelip.core.formulas.network_terms`
(a field of :class:`~sdelip.core.formulas.NetworkTerms`), and its oracle test
(``tests/test_decomposition_protocol.py``'s dense oracle covers every field of LayerTerms).
Nothing drops it silently: a Term or LayerTerms field without a ``repeated_use`` rule makes
:func:`~sdelip.core.formulas.repeated_use_terms` raise, and the tests fail on a Term without a
rule, a LayerTerms field without an oracle, or a Term that is not a LayerTerms field.
"""

from __future__ import annotations

from typing import Callable, Optional

import attrs

__all__ = ["Term", "TERMS", "REALISED_TERMS", "term", "layer_columns", "network_columns", "layer_column", "network_column",
           "SDE_TERMS", "INTEGRABLE_TERMS", "COEFFICIENT_COLUMNS", "LOG_K_COEFFICIENTS", "AUXILIARY_REPEATED_USE",
           "repeated_use_rules"]


# How each per-layer term of a weight θ applied c times becomes the term of the factor σ1(θ)^c
# of K (Prop 8). Itô's lemma for f = σ1^c with ∇f = cσ1^{c−1}J, ∇²f = cσ1^{c−1}H + c(c−1)σ1^{c−2}JJᵀ
# (Thm 14 applied to f): μ_f = cμ, κ_f = cκ + ½c(c−1)‖λ‖², ‖λ_f‖² = c²‖λ‖²; the Prop 6 split puts
# the diagonal J∘J of JJᵀ with the variances; the step curvature gains ½c(c−1)ημ², estimated
# without bias by ημ̂² − ‖λ‖²_sampling (‖λ‖² without the extra noise). Each rule is
# rule(t, c, lr, extra_noise_var) → the factor's value, with t the terms of θ (any object with
# the attributes of LayerTerms: tensors, arrays or floats) and c ≥ 2; None stays None.

def _pair(c: int) -> float:
    return 0.5 * c * (c - 1)


def _power(t, c, lr, s2):
    return t.sigma1**c


def _drift(t, c, lr, s2):
    return c * t.drift


def _noise_curvature(t, c, lr, s2):
    return c * t.noise_curvature + _pair(c) * t.diffusion_sq


def _diffusion_sq(t, c, lr, s2):
    return c * c * t.diffusion_sq


def _noise_curvature_var(t, c, lr, s2):
    if t.noise_curvature_var is None:
        return None
    if t.diffusion_sq_var is None:
        raise ValueError("the Prop 6 split of a weight used more than once needs diffusion_sq_var")
    return c * t.noise_curvature_var + _pair(c) * t.diffusion_sq_var


def _noise_curvature_cov(t, c, lr, s2):
    var = _noise_curvature_var(t, c, lr, s2)
    return None if var is None else _noise_curvature(t, c, lr, s2) - var


def _unchanged(name: str) -> Callable:
    def rule(t, c, lr, s2):
        return getattr(t, name)

    rule.__qualname__ = f"unchanged({name})"
    return rule


def _step_curvature(t, c, lr, s2):
    if t.step_curvature is None:
        return None
    sampling = t.diffusion_sq - lr * s2 / t.sigma1**2
    return c * t.step_curvature + _pair(c) * (lr * t.drift**2 - sampling)


def _diffusion_sq_var(t, c, lr, s2):
    return None if t.diffusion_sq_var is None else c * c * t.diffusion_sq_var


@attrs.frozen
class Term:
    """One per-layer quantity.

    Attributes:
        name: its attribute of :class:`~sdelip.core.formulas.LayerTerms` (``"sigma1"``, ``"drift"``).
        column: the per-layer record column, written ``<column>/<layer>``.
        network: the network column of its Thm 15 aggregate (an attribute of
            :class:`~sdelip.core.formulas.NetworkTerms`), or None (per layer only).
        network_rank: the position of ``network`` among the network columns.
        symbol: the paper's symbol.
        ascii: a plain-text name for tables (``sdelip info``).
        label: a label for plots.
        source: where it is defined.
        sde: computed per trajectory by :class:`~sdelip.sde.LipschitzSDE` (``terms()``).
        integrable: its time integral can be carried as SDE state (``integrate=``).
        coefficient: a coefficient of the dynamics of log K (not the state σ1, not a
            diagnostic such as the gap): what a degenerate step must not drive
            (:func:`sdelip.analysis.prediction.drop_degenerate`).
        repeated_use: rule(t, c, lr, extra_noise_var) → this term of the factor σ1^c that a
            weight applied c ≥ 2 times contributes to K, from the terms t of the weight
            (:func:`sdelip.core.formulas.repeated_use_terms`); required of every term.
    """

    name: str
    column: str
    network: Optional[str]
    network_rank: int
    symbol: str
    ascii: str
    label: str
    source: str
    sde: bool = False
    integrable: bool = False
    coefficient: bool = True
    repeated_use: Optional[Callable] = None


#: Every per-layer quantity, in record-column order.
TERMS: tuple = (
    Term("sigma1", "K", "K", 1, "σ1", "K", "K^(ℓ) = σ1 (operator norm)", "Prop 9", sde=True,
         coefficient=False, repeated_use=_power),
    Term("drift", "drift", "drift_Z", 2, "μ", "mu", "μ (optimization drift)", "Thm 14", sde=True, integrable=True,
         repeated_use=_drift),
    Term("noise_curvature", "noise_curvature", "noise_curvature_Z", 3, "κ", "kappa", "κ (noise curvature)",
         "Thm 14", sde=True, integrable=True, repeated_use=_noise_curvature),
    Term("noise_curvature_var", "noise_curvature_var", "noise_curvature_var_Z", 5, "κ_var", "kappa_var",
         "κ from variances (diag Σ)", "Prop 6", repeated_use=_noise_curvature_var),
    Term("noise_curvature_cov", "noise_curvature_cov", "noise_curvature_cov_Z", 6, "κ_cov", "kappa_cov",
         "κ from covariances", "Prop 6", repeated_use=_noise_curvature_cov),
    Term("diffusion_sq", "diffusion_sq", "diffusion_sq_Z", 4, "‖λ‖²", "lambda^2", "‖λ‖² (diffusion)", "Thm 14",
         sde=True, integrable=True, repeated_use=_diffusion_sq),
    Term("gap", "gap", None, 0, "(σ1 − σ2)/σ1", "gap", "relative spectral gap", "Assumption 11",
         coefficient=False, repeated_use=_unchanged("gap")),
    Term("step_curvature", "step_curvature", "step_curvature_Z", 7, "(η/2σ1)∇LᵀH∇L", "step_curvature",
         "discrete-step drift", "docs/theory.md §6", integrable=True, repeated_use=_step_curvature),
)

#: What the optimizer's update actually did to each layer's σ1 (docs/theory.md §15): measured after
#: ``optimizer.step()`` from Δ = θ_after − θ_before, per unit of SDE time, for every optimizer
#: (:mod:`sdelip.tracking.update`). Not model coefficients: the model's μ and κ + step
#: curvature are set against them. Network aggregates count a weight applied c times as σ1^c.
REALISED_TERMS: tuple = (
    Term("realised_drift", "realised_drift", "realised_drift_Z", 8, "u1ᵀΔv1/(ησ1)", "realised_mu",
         "realised first-order change", "docs/theory.md §15", coefficient=False),
    Term("realised_curvature", "realised_curvature", "realised_curvature_Z", 9, "Q(Δ)/(2ησ1)",
         "realised_curv", "realised second-order change", "docs/theory.md §15", coefficient=False),
)

#: Repeated-use rules of the LayerTerms fields that are not record columns: the degenerate flag
#: (unchanged) and ``diffusion_sq_var``, the Prop 6 split of ‖λ‖² (c² times).
AUXILIARY_REPEATED_USE = {"degenerate": _unchanged("degenerate"), "diffusion_sq_var": _diffusion_sq_var}


def repeated_use_rules() -> dict:
    """LayerTerms field → its repeated-use rule (None for a Term that lacks one): TERMS and the auxiliary fields."""
    return {**{t.name: t.repeated_use for t in TERMS}, **AUXILIARY_REPEATED_USE}


_BY_NAME = {t.name: t for t in TERMS + REALISED_TERMS}


def term(name: str) -> Term:
    """The :class:`Term` of a LayerTerms attribute or record column."""
    t = _BY_NAME.get(name) or next((t for t in TERMS + REALISED_TERMS if t.column == name), None)
    if t is None:
        raise KeyError(f"no term {name!r}; terms: {', '.join(t.name for t in TERMS)}")
    return t


def layer_columns() -> tuple:
    """The per-layer record columns, in order."""
    return tuple(t.column for t in TERMS + REALISED_TERMS)


def network_columns() -> tuple:
    """The network record columns: Z, then the aggregates in rank order."""
    return ("Z",) + tuple(t.network for t in sorted(TERMS + REALISED_TERMS, key=lambda t: t.network_rank)
                          if t.network)


def layer_column(name: str, layer: str) -> str:
    """The record column of term ``name`` for one layer, ``<column>/<layer>`` (e.g. ``drift/fc1``)."""
    return f"{term(name).column}/{layer}"


def network_column(name: str) -> str:
    """The record column of term ``name``'s network aggregate (e.g. ``drift_Z``); KeyError if it has none."""
    t = term(name)
    if t.network is None:
        raise KeyError(f"the term {t.name!r} has no network aggregate (per layer only)")
    return t.network


#: Thm 14's coefficients of d log K, in the order in which Thm 16–17
#: (:func:`sdelip.core.formulas.lipschitz_moments`), :func:`sdelip.analysis.prediction.predict` and the reduced
#: SDE take them: the drift μ, the noise curvature κ and the squared diffusion ‖λ‖²
#: (d log K = (μ + κ − ½‖λ‖²) dt + λᵀ dB).
LOG_K_COEFFICIENTS = ("drift", "noise_curvature", "diffusion_sq")

#: The per-trajectory terms of :meth:`sdelip.sde.LipschitzSDE.terms`, by LayerTerms name.
SDE_TERMS = tuple(t.name for t in TERMS if t.sde)
#: Terms whose integral ``LipschitzSDE(integrate=...)`` can carry.
INTEGRABLE_TERMS = tuple(t.name for t in TERMS if t.integrable)
#: The record columns (per layer and network) of the coefficients of the dynamics.
COEFFICIENT_COLUMNS = frozenset(c for t in TERMS if t.coefficient for c in (t.column, t.network) if c)
