"""Moved to :mod:`sdelip.curvature` (the decomposition routes live beside :mod:`sdelip.spectral`)."""

from ..curvature import *  # noqa: F401,F403
from ..curvature import GramCurvature, decompose_layer, fast_layer_terms, gram_curvature, top_eigenpairs  # noqa: F401
