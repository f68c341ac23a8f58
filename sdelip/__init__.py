"""sdelip: the Lipschitz constant of a neural network under SGD as a system of SDEs.

The public API is re-exported here; submodules whose names start with an underscore
are private. The main entry points:

- math core: :func:`decompose`, :func:`opnorm_jacobian`, :func:`opnorm_hessian_quadform`,
  :func:`opnorm_hessian_diag` (Lemma 12–13), :class:`GradientNoise` (Prop 5–7),
  :func:`layer_terms`, :func:`network_terms`, :func:`lipschitz_moments` (Thm 14–17);
- tracking: :class:`Tracker` (options: :class:`TrackingOptions`, :class:`RecordOptions`,
  :class:`RuntimeOptions`), :func:`load_record`, :func:`predict`;
- simulation: :class:`ParameterSDE`, :class:`LipschitzSDE`, :class:`ReducedLipschitzSDE`,
  :func:`simulate`, :func:`simulate_record`;
- errors: every public exception and warning, defined in :mod:`sdelip.errors`;
- workbench: :mod:`sdelip.workbench.models`, :mod:`sdelip.workbench.data`, :mod:`sdelip.workbench.regularizers`,
  :func:`train`, :mod:`sdelip.analysis.plotting`, and the ``sdelip`` command line.
"""

from . import _legacy, optim
from .workbench import data, models, regularizers
from . import errors
from .errors import (
    BatchAxisError,
    NoOptimizerRuleError,
    UnmodelledUpdateError,
    LearningRateScheduleError,
    UnsupportedOptimizerError,
    CheckpointError,
    CheckpointWriteError,
    DatasetFallbackWarning,
    DatasetNotFoundError,
    DegenerateSpectrumError,
    DegenerateSpectrumWarning,
    EngineError,
    EngineNotApplicableError,
    GradientAccumulationError,
    InputMismatchError,
    NoTrackableLayerError,
    NonFiniteError,
    NotARecordError,
    NotPlainSGDWarning,
    RecordExistsError,
    RecordLockedError,
    ResumeError,
    RuleError,
    SharedTensorWarning,
    SmallBatchWarning,
    UnsafeCheckpointError,
    UnsupportedLayerError,
    WeightUsesError,
)
from .core.formulas import (
    LayerTerms,
    LipschitzMoments,
    NetworkTerms,
    layer_terms,
    lipschitz_moments,
    network_terms,
    terms_from_projections,
)
from .rules.inventory import TrackedLayer, tracked_layers
from .core.noise import GradientNoise
from .analysis.prediction import predict
from .record import StepRecord, load_metadata, load_record
from .tracking.schedule import EveryN, EveryStep, LogSchedule
from .sde import (
    GradientEstimate,
    GridBrownian,
    LipschitzSDE,
    ParameterSDE,
    ReducedLipschitzSDE,
    SimulationResult,
    simulate,
    simulate_record,
    time_grid,
)
from .core.spectral import (
    SpectralDecomposition,
    decompose,
    opnorm_hessian,
    opnorm_hessian_diag,
    opnorm_hessian_quadform,
    opnorm_jacobian,
    spectral_gap,
    top_singular,
    weight_matrix,
)
from .tracking.tracker import Tracker
from .tracking.options import RecordOptions, RuntimeOptions, TrackingOptions
from .workbench.train import TrainConfig, TrainResult, train

_legacy.install()  # old import paths (sdelip.tracker, sdelip.spectral, ...) for one release

__version__ = "0.1.0"

__all__ = [
    "NoOptimizerRuleError", "UnmodelledUpdateError", "UnsupportedOptimizerError",
    "data", "models", "regularizers",
    "errors", *errors.__all__,  # every public exception and warning (sdelip.errors)
    "LayerTerms", "LipschitzMoments", "NetworkTerms", "layer_terms", "lipschitz_moments", "network_terms",
    "terms_from_projections",
    "TrackedLayer", "tracked_layers",
    "GradientNoise",
    "SpectralDecomposition", "decompose", "opnorm_hessian", "opnorm_hessian_diag", "opnorm_hessian_quadform",
    "opnorm_jacobian", "spectral_gap", "top_singular", "weight_matrix",
    "Tracker", "TrackingOptions", "RecordOptions", "RuntimeOptions", "StepRecord", "load_record", "load_metadata", "predict", "EveryN", "EveryStep", "LogSchedule",
    "GradientEstimate", "GridBrownian", "time_grid", "LipschitzSDE", "ParameterSDE", "ReducedLipschitzSDE", "SimulationResult", "simulate",
    "simulate_record",
    "TrainConfig", "TrainResult", "train",
]
