"""The regularizer configuration of Appendix B (Table 3) and its presets."""

from __future__ import annotations

from typing import Optional

import attrs
from ._checks import _is_bool, _non_negative, _noise_kind, _optional_positive, _optional_unit_interval, _unit_interval


@attrs.frozen
class RegularizerConfig:
    """Which regularizers a run uses (Appendix B, Table 3; Sec 8.4; Sec 8.5).

    Attributes:
        mixup_alpha: mixup Beta(α, α) parameter (paper: 0.4); None disables mixup.
        label_smoothing: label-smoothing ε in [0, 1] (paper: 0.1); 0 disables it.
        fgsm_eps: FGSM adversarial-training ε in pixel units (paper: 0.03); None
            disables it. See :func:`fgsm_perturb` for the units.
        weight_decay: L2 coefficient λ ≥ 0 (paper: 1e-3), applied through
            ``torch.optim.SGD(weight_decay=λ)`` (:func:`make_optimizer`), i.e. the loss
            gains (λ/2)‖θ‖² and every layer's drift μ exactly −λ.
        autoaugment: apply AutoAugment (CIFAR10 / CIFAR100 policy) as a data transform.
        dropout: the (*) Dropout layers of Table 1 (ConvNet only).
        batchnorm: the (*) BatchNorm layer of Table 1 (ConvNet only).
        noisy_gradient_rho: Sec 8.4 ρ in [0, 1]; None disables noisy gradients.
        noisy_gradient_noise: ``"gaussian"`` N(0,1), ``"uniform"`` U[−0.5, 0.5] or ``"zero"``.
        label_corruption: Sec 8.5 uniform label-corruption probability ε in [0, 1].
    """

    mixup_alpha: Optional[float] = attrs.field(default=None, validator=_optional_positive)
    label_smoothing: float = attrs.field(default=0.0, validator=_unit_interval)
    fgsm_eps: Optional[float] = attrs.field(default=None, validator=_optional_positive)
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    autoaugment: bool = attrs.field(default=False, validator=_is_bool)
    dropout: bool = attrs.field(default=False, validator=_is_bool)
    batchnorm: bool = attrs.field(default=False, validator=_is_bool)
    noisy_gradient_rho: Optional[float] = attrs.field(default=None, validator=_optional_unit_interval)
    noisy_gradient_noise: str = attrs.field(default="gaussian", validator=_noise_kind)
    label_corruption: float = attrs.field(default=0.0, validator=_unit_interval)

    def active(self) -> list[str]:
        """Names of the regularizers switched on (empty for the plain configuration)."""
        out = []
        if self.mixup_alpha is not None:
            out.append(f"mixup(alpha={self.mixup_alpha:g})")
        if self.label_smoothing > 0:
            out.append(f"label_smoothing({self.label_smoothing:g})")
        if self.fgsm_eps is not None:
            out.append(f"fgsm(eps={self.fgsm_eps:g})")
        if self.weight_decay > 0:
            out.append(f"weight_decay({self.weight_decay:g})")
        if self.autoaugment:
            out.append("autoaugment")
        if self.dropout:
            out.append("dropout")
        if self.batchnorm:
            out.append("batchnorm")
        if self.noisy_gradient_rho is not None:
            out.append(f"noisy_gradient(rho={self.noisy_gradient_rho:g}, {self.noisy_gradient_noise})")
        if self.label_corruption > 0:
            out.append(f"label_corruption({self.label_corruption:g})")
        return out


#: The paper's named configurations (Table 3 values; one regularizer each).
PRESETS: dict[str, RegularizerConfig] = {
    "none": RegularizerConfig(),
    "batchnorm": RegularizerConfig(batchnorm=True),
    "dropout": RegularizerConfig(dropout=True),
    "weight_decay": RegularizerConfig(weight_decay=1e-3),
    "mixup": RegularizerConfig(mixup_alpha=0.4),
    "label_smoothing": RegularizerConfig(label_smoothing=0.1),
    "autoaugment": RegularizerConfig(autoaugment=True),
    "fgsm": RegularizerConfig(fgsm_eps=0.03),
}


def get_preset(name: str) -> RegularizerConfig:
    """The preset ``name`` of :data:`PRESETS` (``-`` and ``_`` are interchangeable)."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in PRESETS:
        raise ValueError(f"unknown regularizer preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[key]


# ---------------------------------------------------------------------------------------
# Per-sample losses: label smoothing, mixup, FGSM
# ---------------------------------------------------------------------------------------
