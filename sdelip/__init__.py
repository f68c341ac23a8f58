"""sdelip: the Lipschitz constant of a neural network under SGD as a system of SDEs.

The public API is re-exported here; submodules whose names start with an underscore
are private.
"""

from ._checks import DegenerateSpectrumError, DegenerateSpectrumWarning, NonFiniteError
from .dynamics import (
    LayerTerms,
    LipschitzMoments,
    NetworkTerms,
    layer_terms,
    lipschitz_moments,
    network_terms,
    terms_from_projections,
)
from .layers import NoTrackableLayerError, TrackedLayer, tracked_layers
from .noise import GradientNoise
from .spectral import (
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

__version__ = "0.1.0"
