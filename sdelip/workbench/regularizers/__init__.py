"""Regularizers of Appendix B (Table 3), noisy gradients (Sec 8.4), label corruption (Sec 8.5).

The tracker needs per-sample gradients of the loss that is actually optimised, so
every loss here is *per sample*: :func:`per_sample_loss` returns a vector of shape
(M,), and the training loop back-propagates its mean.

==================  =============================  ===================================
regularizer         Table 3 / section              where it acts
==================  =============================  ===================================
mixup               α = 0.4                        :func:`per_sample_loss`
label smoothing     ε = 0.1                        :func:`per_sample_loss`
FGSM adv. training  ε = 0.03 (pixel units)         :func:`per_sample_loss`
weight decay        λ = 1e-3                       :func:`make_optimizer` (SGD)
AutoAugment         CIFAR10 / CIFAR100 policy      :func:`autoaugment_transform`
dropout, batchnorm  Table 1 (*) layers             model flags (``build_model``)
noisy gradient      ρ, noise ∈ {N(0,1), U, 0}      :class:`NoisyGradient` (Sec 8.4)
label corruption    ε ∈ [0, 1]                     :class:`CorruptedLabels` (Sec 8.5)
==================  =============================  ===================================
"""

from ._checks import NOISE_KINDS
from .augment import autoaugment_transform
from .config import PRESETS, RegularizerConfig, get_preset
from .label_corruption import CorruptedLabels, with_label_corruption
from .losses import draw_mixup, fgsm_perturb, per_sample_loss
from .noisy_gradient import NoisyGradient
from .optimizer import make_optimizer

__all__ = [
    "NOISE_KINDS",
    "PRESETS",
    "RegularizerConfig",
    "get_preset",
    "draw_mixup",
    "fgsm_perturb",
    "per_sample_loss",
    "make_optimizer",
    "NoisyGradient",
    "CorruptedLabels",
    "with_label_corruption",
    "autoaugment_transform",
]
