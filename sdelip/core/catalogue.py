"""Each quantity of the Lipschitz dynamics defined once (Thm 14–15, Prop 6, Assumption 11).

A :class:`Term` names a per-layer quantity by its attribute of
:class:`sdelip.core.formulas.LayerTerms`, its record column, its network aggregate (Thm 15)
and how it is shown (symbol, ASCII name for tables, label for plots). The record schema
(:mod:`sdelip.record`), the tracker's rows, the SDE systems' term names and integrable
state columns (:mod:`sdelip.sde`), and the plot labels derive from :data:`TERMS`.

Adding a term: one entry here, its formula in :mod:`sdelip.core.formulas` (and its Gram-route
twin in :mod:`sdelip.core.decompositions`), its network aggregate in
:func:`sdelip.core.formulas.network_terms`, and its test against a dense oracle.
"""

from __future__ import annotations

from typing import Optional

import attrs

__all__ = ["Term", "TERMS", "term", "layer_columns", "network_columns", "layer_column", "network_column",
           "SDE_TERMS", "INTEGRABLE_TERMS", "COEFFICIENT_COLUMNS", "LOG_K_COEFFICIENTS"]


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


#: Every per-layer quantity, in record-column order.
TERMS: tuple = (
    Term("sigma1", "K", "K", 1, "σ1", "K", "K^(ℓ) = σ1 (operator norm)", "Prop 9", sde=True,
         coefficient=False),
    Term("drift", "drift", "drift_Z", 2, "μ", "mu", "μ (optimization drift)", "Thm 14", sde=True, integrable=True),
    Term("noise_curvature", "noise_curvature", "noise_curvature_Z", 3, "κ", "kappa", "κ (noise curvature)",
         "Thm 14", sde=True, integrable=True),
    Term("noise_curvature_var", "noise_curvature_var", "noise_curvature_var_Z", 5, "κ_var", "kappa_var",
         "κ from variances (diag Σ)", "Prop 6"),
    Term("noise_curvature_cov", "noise_curvature_cov", "noise_curvature_cov_Z", 6, "κ_cov", "kappa_cov",
         "κ from covariances", "Prop 6"),
    Term("diffusion_sq", "diffusion_sq", "diffusion_sq_Z", 4, "‖λ‖²", "lambda^2", "‖λ‖² (diffusion)", "Thm 14",
         sde=True, integrable=True),
    Term("gap", "gap", None, 0, "(σ1 − σ2)/σ1", "gap", "relative spectral gap", "Assumption 11",
         coefficient=False),
    Term("step_curvature", "step_curvature", "step_curvature_Z", 7, "(η/2σ1)∇LᵀH∇L", "step_curvature",
         "discrete-step drift", "docs/theory.md §6", integrable=True),
)

_BY_NAME = {t.name: t for t in TERMS}


def term(name: str) -> Term:
    """The :class:`Term` of a LayerTerms attribute or record column."""
    t = _BY_NAME.get(name) or next((t for t in TERMS if t.column == name), None)
    if t is None:
        raise KeyError(f"no term {name!r}; terms: {', '.join(t.name for t in TERMS)}")
    return t


def layer_columns() -> tuple:
    """The per-layer record columns, in order."""
    return tuple(t.column for t in TERMS)


def network_columns() -> tuple:
    """The network record columns: Z, then the aggregates in rank order."""
    return ("Z",) + tuple(t.network for t in sorted(TERMS, key=lambda t: t.network_rank) if t.network)


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
