"""Centralised input checking with explicit messages.

Every public entry point validates its arguments here so that errors name the
offending argument, layer, step and value instead of surfacing as shape errors
deep inside a matrix product.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch


class DegenerateSpectrumWarning(UserWarning):
    """The top singular value of a weight matrix is (nearly) repeated.

    Lemma 13 and Theorem 14 assume σ1 > σ2 (Assumption 11). When the relative gap
    (σ1 − σ2)/σ1 falls below the tolerance the operator-norm Hessian is
    ill-conditioned; sdelip clamps the gap and flags the value instead of
    returning inf or NaN.
    """


class DegenerateSpectrumError(ValueError):
    """Raised instead of :class:`DegenerateSpectrumWarning` when asked to, or when σ1 = 0."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient or dynamics term is NaN or infinite."""


def _where(name: Optional[str]) -> str:
    return f" for layer {name!r}" if name else ""


def check_matrix(W: torch.Tensor, arg: str = "W", name: Optional[str] = None) -> None:
    """Check that ``W`` is a finite floating-point matrix of shape (m, n)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{arg}{_where(name)} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(
            f"{arg}{_where(name)} must be a matrix of shape (m, n), got shape {tuple(W.shape)}; "
            "reshape Conv2d weights with sdelip.spectral.weight_matrix"
        )
    if not W.is_floating_point():
        raise TypeError(f"{arg}{_where(name)} must be floating point, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{arg}{_where(name)} is empty (shape {tuple(W.shape)})")
    check_finite(W, arg, name)


def check_finite(x: torch.Tensor, arg: str, name: Optional[str] = None, step: Optional[int] = None) -> None:
    """Raise :class:`NonFiniteError` naming ``arg``, the layer and the step if ``x`` has NaN/Inf."""
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        at = f" at step {step}" if step is not None else ""
        raise NonFiniteError(f"{arg}{_where(name)}{at} has {n_bad} non-finite value(s) (NaN or Inf)")


def check_directions(E: torch.Tensor, shape: tuple[int, int], arg: str = "E") -> None:
    """Check that ``E`` is a batch of (m, n) directions with trailing shape ``shape``."""
    if E.ndim < 2 or tuple(E.shape[-2:]) != tuple(shape):
        raise ValueError(f"{arg} must have shape (..., {shape[0]}, {shape[1]}), got {tuple(E.shape)}")


def check_per_sample(G: torch.Tensor, name: Optional[str] = None) -> None:
    """Check per-sample gradients of shape (M, m, n) with M >= 2 (Prop 5 needs M − 1 > 0)."""
    if not isinstance(G, torch.Tensor) or G.ndim != 3:
        shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
        raise ValueError(f"per-sample gradients{_where(name)} must have shape (M, m, n), got {shape}")
    check_batch_size(G.shape[0], name)
    check_finite(G, "per-sample gradients", name)


def check_batch_size(M: int, name: Optional[str] = None) -> None:
    """The unbiased estimator of Prop 5 divides by M − 1: M must be at least 2."""
    if M < 2:
        raise ValueError(
            f"the gradient-noise estimator (Prop 5) needs at least 2 samples{_where(name)}, got M = {M}: "
            "its unbiased covariance divides by M − 1; use a mini-batch of size >= 2"
        )


def check_positive(value: float, arg: str) -> float:
    """Check a strictly positive finite scalar (learning rate, time step)."""
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{arg} must be a positive finite number, got {value!r}")
    return v


def check_gap(
    sigma1: float,
    gap: float,
    gap_tol: float,
    on_degenerate: str,
    name: Optional[str] = None,
    step: Optional[int] = None,
) -> bool:
    """Apply the degenerate-spectrum policy; returns True when the spectrum is degenerate.

    Args:
        sigma1: the top singular value.
        gap: the relative gap (σ1 − σ2)/σ1.
        gap_tol: gaps below this are degenerate.
        on_degenerate: "warn", "raise" or "ignore".
        name: layer name for the message.
        step: training step for the message.
    """
    if on_degenerate not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_degenerate must be 'warn', 'raise' or 'ignore', got {on_degenerate!r}")
    at = f" at step {step}" if step is not None else ""
    if not sigma1 > 0:
        raise DegenerateSpectrumError(
            f"the top singular value{_where(name)}{at} is {sigma1!r}: the operator norm is not differentiable at 0"
        )
    if gap >= gap_tol:
        return False
    msg = (
        f"degenerate top singular value{_where(name)}{at}: relative gap (σ1 − σ2)/σ1 = {gap:.3g} "
        f"< tolerance {gap_tol:.3g} (Assumption 11); the operator-norm Hessian is ill-conditioned "
        "and its weights 1/(σ1² − σk²) are clamped at the tolerance"
    )
    if on_degenerate == "raise":
        raise DegenerateSpectrumError(msg)
    if on_degenerate == "warn":
        warnings.warn(msg, DegenerateSpectrumWarning, stacklevel=3)
    return True
