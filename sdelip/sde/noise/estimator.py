"""The model-and-data estimator of a :class:`~sdelip.sde.ParameterSDE` (Def 4's coefficients).

From the model, its training data and the options: the data source, M, where the
expected gradient comes from (:class:`~sdelip.sde.noise.materialised.ModelGradients`) and the
engine of the noise: the factored weighted backward (:mod:`sdelip.sde.noise.factored`),
the reshuffled pass over the data (:mod:`sdelip.sde.noise.reshuffle`) or materialised
per-sample gradients. A user's ``gradient_fn`` replaces all of it.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs

from ..._checks import check_sde_factored_layers, check_sde_reshuffle_data
from ...engines import EngineError
from .data import DataSource
from .materialised import ModelGradients
from .reshuffle import ReshufflePass
from .factored import FactoredNoise

__all__ = ["ModelEstimator", "model_estimator"]


@attrs.frozen
class ModelEstimator:
    """What :func:`model_estimator` chose: data, gradients, M, engine and the noise pass of that engine."""

    data: DataSource
    gradient_fn: ModelGradients
    M: int
    engine: str
    factored: Optional[FactoredNoise] = None
    reshuffle: Optional[ReshufflePass] = None


def model_estimator(model, layout, layers, loader, *, sampling: str, engine: str, loss_fn=None, M=None,
                    grad_source: str = "auto", full_max: int = 10_000, grad_batch_size: int = 4096,
                    shared_noise_batch: bool = False, seed: int = 0, traj_chunk=None, data_chunk: int = 4096,
                    max_cached: int = 50_000) -> ModelEstimator:
    """The estimator of Def 4's coefficients from a model and its data (the arguments of ParameterSDE).

    ``engine="auto"`` takes the factored engine unless a tracked weight is tied, is not
    applied as its module's ``.weight`` by the module's own forward (iid sampling), or a
    tracked module does not keep the samples on axis 0; an explicit engine that cannot
    apply is refused with the reason.
    """
    if loader is None:
        raise TypeError("ParameterSDE needs training data (loader) or a gradient_fn")
    data = DataSource(loader, max_cached=max_cached, seed=seed)
    M = M if M is not None else data.batch_size
    if M is None:
        raise TypeError("pass noise_batch_size (M): the training data has no batch size")
    if sampling == "reshuffle":
        check_sde_reshuffle_data(grad_source, data, M, max_cached)
        grad_source = "full"
    gradient_fn = ModelGradients(
        model, layout, data, loss_fn=loss_fn, noise_batch_size=M, grad_source=grad_source,
        full_max=full_max, grad_batch_size=grad_batch_size, shared_noise_batch=shared_noise_batch,
        traj_chunk=traj_chunk, data_chunk=data_chunk,
    )
    tied = [layer for layer in layers if layer.uses != 1 or layer.aliases]
    # the iid factored noise runs each tracked module's own forward: rules that apply .weight in it
    # (the reshuffled pass differentiates the whole model and needs no rule)
    other = [] if sampling == "reshuffle" else \
        [layer for layer in layers if not layer.rule.sde_factored or layer.attr != "weight"]
    chosen = ("materialised" if tied or other else "factored") if engine == "auto" else engine
    check_sde_factored_layers(chosen, tied, other)
    factored: Any = None
    reshuffle = None
    if chosen == "factored" and sampling == "reshuffle":
        reshuffle = ReshufflePass(model, gradient_fn.loss_fn)
    elif chosen == "factored":
        factored = FactoredNoise(model, layout, layers, gradient_fn.loss_fn)
        try:  # the samples on axis 0 of every tracked module, or the materialised engine
            ref = next(p for p in model.parameters() if p.requires_grad)
            factored.check_layout(data.example(device=ref.device, dtype=ref.dtype)[0])
        except EngineError:
            if engine != "auto":
                raise
            chosen, factored = "materialised", None
    return ModelEstimator(data, gradient_fn, int(M), chosen, factored, reshuffle)
