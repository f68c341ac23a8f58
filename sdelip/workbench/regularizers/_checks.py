"""Validators shared by the regularizer configuration and functions."""

from __future__ import annotations

import math

#: Noise distributions of Sec 8.4 and their elementwise variances Var(n).
NOISE_KINDS = {"gaussian": 1.0, "uniform": 1.0 / 12.0, "zero": 0.0}


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _optional_positive(instance, attribute, value):
    if value is not None and not (_finite(value) and float(value) > 0):
        raise ValueError(f"{attribute.name} must be None or a positive finite number, got {value!r}")


def _unit_interval(instance, attribute, value):
    if not (_finite(value) and 0.0 <= float(value) <= 1.0):
        raise ValueError(f"{attribute.name} must lie in [0, 1], got {value!r}")


def _optional_unit_interval(instance, attribute, value):
    if value is not None:
        _unit_interval(instance, attribute, value)


def _non_negative(instance, attribute, value):
    if not (_finite(value) and float(value) >= 0.0):
        raise ValueError(f"{attribute.name} must be a non-negative finite number, got {value!r}")


def _is_bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be True or False, got {value!r}")


def _noise_kind(instance, attribute, value):
    if value not in NOISE_KINDS:
        raise ValueError(f"{attribute.name} must be one of {', '.join(NOISE_KINDS)}, got {value!r}")
