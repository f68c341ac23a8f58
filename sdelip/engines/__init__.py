"""Per-sample statistics engines behind one interface (docs/theory.md §8).

=================  ==========================================================  ===========================
engine             how                                                         applies to
=================  ==========================================================  ===========================
``factored``       the layer rules' hooks on the step's own forward/backward   every rule of sdelip.rules,
                   (:mod:`sdelip.rules`); no per-sample gradient of the        independent samples (the
                   network                                                     default)
``materialised``   ``torch.func.vmap`` over samples (the paper's approach)     any model, independent
                                                                               samples; the oracle
``coupled``        batched VJPs of the per-sample losses through the graph     any model, incl. BatchNorm
                                                                               in training mode
=================  ==========================================================  ===========================

:func:`resolve_engine_name` resolves ``"auto"``: coupled when a BatchNorm normalises with
batch statistics or a tracked weight is also held by a module that no rule watches for it,
factored otherwise.
"""

from __future__ import annotations

from typing import Optional

from .base import (
    DEFAULT_CHUNK_BYTES,
    VECTORISED_CHUNK_BYTES,
    Engine,
    EngineError,
    EngineNotApplicableError,
    LayerStatistics,
    StatisticsAccumulator,
    WeightUsesError,
    coupling_modules,
    untracked_weight_users,
)
from .coupled import CoupledEngine
from .factored import FactoredEngine, SharedTensorWarning
from .materialised import MaterialisedEngine

__all__ = [
    "Engine",
    "EngineError",
    "EngineNotApplicableError",
    "LayerStatistics",
    "StatisticsAccumulator",
    "WeightUsesError",
    "FactoredEngine",
    "SharedTensorWarning",
    "MaterialisedEngine",
    "CoupledEngine",
    "ENGINES",
    "coupling_modules",
    "untracked_weight_users",
    "resolve_engine_name",
    "make_engine",
    "DEFAULT_CHUNK_BYTES",
    "VECTORISED_CHUNK_BYTES",
]

#: Engine classes by name.
ENGINES = {"factored": FactoredEngine, "materialised": MaterialisedEngine, "coupled": CoupledEngine}
_ALIASES = {"materialized": "materialised", "vmap": "materialised", "hooks": "factored"}


def resolve_engine_name(model, requested: str = "auto") -> str:
    """The engine to use: ``requested``, or for ``"auto"`` factored unless the model needs coupled.

    ``"auto"`` gives coupled when samples are coupled (:func:`coupling_modules`) or a
    tracked weight is also held by a module that no rule watches for it
    (:func:`untracked_weight_users`), factored otherwise.
    """
    if isinstance(requested, type) and issubclass(requested, Engine):
        return requested.name
    key = str(requested).strip().lower()
    key = _ALIASES.get(key, key)
    if key == "auto":
        return "coupled" if coupling_modules(model) or untracked_weight_users(model) else "factored"
    if key not in ENGINES:
        raise ValueError(f"unknown engine {requested!r}; choose 'auto', {', '.join(map(repr, ENGINES))}")
    return key


def make_engine(name: str, model, layers, split: bool = True, chunk_bytes: Optional[int] = None,
                loss_fn=None, **kwargs) -> Engine:
    """Construct the engine ``name`` (already resolved) for ``model`` (``chunk_bytes=None``: its default)."""
    cls = ENGINES[name]
    if cls is MaterialisedEngine:
        return cls(model, layers, split=split, chunk_bytes=chunk_bytes, loss_fn=loss_fn, **kwargs)
    return cls(model, layers, split=split, chunk_bytes=chunk_bytes, **kwargs)
