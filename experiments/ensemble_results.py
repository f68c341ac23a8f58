"""The ensemble validation's task results read back as ensembles: real SGD runs and the parameter SDE.

The sweep hands ``reduce`` each task's :class:`sdelip.workbench.sweep.TaskResult` (its JSON value
and its record folder); :func:`real_ensembles` and :func:`parameter_sde` join the runs of
one kind into a small record with named arrays, which the statistics
(:mod:`ensemble_stats`), the figures (:mod:`ensemble_figures`) and the reduce steps read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs
import numpy as np

from ensemble_settings import SCHEMES, SDE_PREFIX

__all__ = ["RealEnsemble", "ParameterSDEEnsemble", "real_ensembles", "parameter_sde"]


@attrs.frozen
class RealEnsemble:
    """The N real SGD runs of one sampling scheme.

    Attributes:
        records: every run's record (a DataFrame with a row per step 0..T − 1), seeds 1..N.
        K_final: every run's K after the last update (the tasks' ``K_final``).
        log_K_layers: (N, T + 1, L) log K^(ℓ) at steps 0..T (step T from the tasks'
            ``log_K_final_layers``).
        info: the first run's task value (``data``, ``data_source``, ``n_train``, ...).
        relative_gap: (N, T, L) the records' relative gaps (σ1 − σ2)/σ1 per layer.
    """

    records: list
    K_final: list
    log_K_layers: np.ndarray
    info: dict
    relative_gap: np.ndarray

    @property
    def log_K(self) -> np.ndarray:
        """(T + 1, N) log K of the network (the layers' sum), a column per run."""
        return self.log_K_layers.sum(-1).T


@attrs.frozen
class ParameterSDEEnsemble:
    """The parameter SDE's trajectories of one noise coupling, its chunks joined (arrays (T + 1, n′, L)).

    Attributes:
        log_K_ito_sc: the Itô-integrated log K^(ℓ), step curvature included.
        int_step_curvature: the time integral of the step curvature (Itô without it is the
            difference).
        log_K_direct: log σ1 of the simulated weights (NaN between ``direct_every`` steps).
        relative_gap: (σ1 − σ2)/σ1 of the simulated weights (NaN likewise).
        chunks: the chunks' :class:`sdelip.workbench.sweep.TaskResult`, in chunk order.
    """

    log_K_ito_sc: np.ndarray
    int_step_curvature: np.ndarray
    log_K_direct: np.ndarray
    relative_gap: np.ndarray
    chunks: list

    @property
    def n(self) -> int:
        """Trajectories over all chunks."""
        return sum(c.value["n"] for c in self.chunks)

    @property
    def seconds(self) -> float:
        """The chunks' run time, summed."""
        return sum(c.seconds for c in self.chunks)


def real_ensembles(results, s, schemes=tuple(SCHEMES)) -> dict[str, RealEnsemble]:
    """Scheme → its :class:`RealEnsemble`, from the ``<scheme>/seed=<k>`` task results."""
    from sdelip.record import load_record
    import sdelip.analysis.plotting as splot

    out = {}
    for scheme in schemes:
        runs = [results[f"{scheme}/seed={seed}"] for seed in range(1, s["n_runs"] + 1)]
        records = [load_record(Path(r.dir) / "record.db") for r in runs]
        layers = splot.layer_names(records[0])
        logk = np.stack([np.concatenate([np.log(rec[[f"K/{name}" for name in layers]].to_numpy()),
                                         np.asarray(r.value["log_K_final_layers"])[None]], 0)
                         for rec, r in zip(records, runs)])
        gap = np.stack([rec[[f"gap/{name}" for name in layers]].to_numpy() for rec in records])
        out[scheme] = RealEnsemble(records=records, K_final=[r.value["K_final"] for r in runs], log_K_layers=logk,
                                   info=runs[0].value, relative_gap=gap)
    return out


def parameter_sde(results, coupling: str = "layers") -> Optional[ParameterSDEEnsemble]:
    """The parameter SDE's chunks of one coupling joined along the trajectories (None if not run).

    Raises:
        RuntimeError: no chunk of the ``"layers"`` coupling (every full run has them).
    """
    chunks = sorted((r for name, r in results.items() if name.startswith(SDE_PREFIX[coupling] + "/")),
                    key=lambda r: r.value["chunk"])
    if not chunks:
        if coupling == "layers":
            raise RuntimeError("no parameter-SDE task results")
        return None
    arrays = [np.load(Path(r.dir) / "sde.npz") for r in chunks]
    join = {key: np.concatenate([a[key] for a in arrays], 1)
            for key in ("log_K_ito_sc", "int_step_curvature", "log_K_direct", "relative_gap")}
    return ParameterSDEEnsemble(**join, chunks=chunks)
