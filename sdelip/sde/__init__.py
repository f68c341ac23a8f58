"""torchsde systems for the Lipschitz dynamics of SGD (Def 4, Def 10, Thm 14–17).

- :class:`ParameterSDE` — Def 4: the parameters of a model under SGD as an Itô SDE,
  drift and diffusion estimated live from the model and its data (torch.func).
- :class:`LipschitzSDE` — Def 10: the parameters together with the per-layer
  log K^(ℓ) (Thm 14), driven by the same Brownian increments: the parameter system
  composed with extra state rows (:class:`LogLipschitzRows`, an :class:`ExtraRows`
  computed from the parameters' :class:`Evaluation`).
- :class:`DenseDiffusion` — a system with its dense diffusion matrix ``g`` (tests and
  small models; the systems themselves offer torchsde ``g_prod`` only).
- :class:`ReducedLipschitzSDE` — the Z-system of a tracking record, piecewise-constant
  coefficients per step, for 10⁴+ cheap trajectories (Thm 15–17).
- :class:`GridBrownian` — a grid-aligned, seeded Brownian motion for long runs.
- :class:`EpochBrownian` — the same, pinned within each epoch: the driver of
  reshuffled SGD's noise (``sampling="reshuffle"``).
- :func:`simulate`, :func:`simulate_record` — the Monte Carlo front end.
"""

from .brownian import GridBrownian, time_grid
from .epoch_brownian import EpochBrownian
from .noise.data import DataSource
from .dense import DenseDiffusion
from .evaluation import Evaluation, ExtraRows, NoiseObserver
from .noise.materialised import GradientEstimate
from .layout import ParamLayout
from .lipschitz_sde import LipschitzSDE, LogLipschitzRows
from .options import ComputeOptions, DriftOptions, LogKOptions, NoiseOptions, SecondMomentOptions
from .parameter_sde import ParameterSDE
from .optimizer_sde import OptimizerSDE
from .reduced import ReducedLipschitzSDE, record_lr, record_step_sizes
from .simulate import SimulationResult, simulate, simulate_record

__all__ = [
    "OptimizerSDE",
    "GridBrownian",
    "EpochBrownian",
    "time_grid",
    "DataSource",
    "GradientEstimate",
    "ParamLayout",
    "ParameterSDE",
    "LipschitzSDE",
    "LogLipschitzRows",
    "DriftOptions",
    "NoiseOptions",
    "ComputeOptions",
    "LogKOptions",
    "SecondMomentOptions",
    "DenseDiffusion",
    "Evaluation",
    "ExtraRows",
    "NoiseObserver",
    "ReducedLipschitzSDE",
    "record_lr",
    "record_step_sizes",
    "SimulationResult",
    "simulate",
    "simulate_record",
]
