"""SGD with the Table 3 weight decay."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from ._checks import _finite
from .config import RegularizerConfig


def make_optimizer(params: Iterable, lr: float, config: Optional[RegularizerConfig] = None) -> torch.optim.SGD:
    """Plain SGD (no momentum, as in the paper) with the configured weight decay.

    ``weight_decay=λ`` makes every step θ ← θ − η(∇L + λθ): the update differs from
    the undecayed one by exactly −ηλθ, for every parameter passed (biases included).
    """
    config = RegularizerConfig() if config is None else config
    if not (_finite(lr) and lr > 0):
        raise ValueError(f"learning rate must be a positive finite number, got {lr!r}")
    return torch.optim.SGD(params, lr=float(lr), momentum=0.0, weight_decay=float(config.weight_decay))


# ---------------------------------------------------------------------------------------
# Noisy gradients (Sec 8.4)
# ---------------------------------------------------------------------------------------
