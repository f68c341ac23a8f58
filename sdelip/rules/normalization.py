"""Normalisation layers: their affine parameters are elementwise, not weight matrices (Prop 9).

LayerNorm over several axes, GroupNorm, BatchNorm, InstanceNorm and RMSNorm multiply
elementwise; a ``LayerNorm([C, H])`` holds a two-dimensional ``weight`` that is a
diagonal map, not a matrix θ^(ℓ) of the product bound. This rule tracks none of them, so
the per-module fallback does not take them for weight matrices; they are listed as left
out (:func:`sdelip.rules.inventory.weight_inventory`). BatchNorm in training mode couples the
samples, which the engines handle (:func:`sdelip.engines.coupling_modules`).
"""

from __future__ import annotations

from torch import nn

from .base import LayerRule, Use, register_rule

__all__ = ["NormalizationRule"]

_NORMS = [nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase]
if hasattr(nn, "RMSNorm"):
    _NORMS.append(nn.RMSNorm)


@register_rule(*_NORMS)
class NormalizationRule(LayerRule):
    """Tracks nothing: normalisation scales and shifts are elementwise (Prop 9)."""

    name = "normalization"

    def weights(self, module) -> list[str]:
        return []

    def couples_samples(self, module) -> bool:
        """BatchNorm normalising with batch statistics (training mode, or no running statistics)."""
        return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)

    def attach(self, module, attrs_, sink) -> list:
        return []

    def statistics(self, use: Use, u1, v1, split, chunk_bytes, with_sum_g=True):  # pragma: no cover - no weights
        raise NotImplementedError

    def per_sample_grads(self, use: Use, start: int, stop: int):  # pragma: no cover - no weights
        raise NotImplementedError
