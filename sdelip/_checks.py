"""Centralised input checking with explicit messages.

The argument checks of the entry points live here (the Tracker and ``Tracker.backward``'s
losses, ``TrainConfig``, ``ParameterSDE`` and ``LipschitzSDE``, the spectral and dynamics
formulas), so that errors name the offending argument, layer, step and value instead of
surfacing as shape errors deep inside a matrix product. Checks of a module's own data
rather than of an argument (a record's columns, a coefficient table's shape, a dataset's
files) raise where that data is read, in the same style.

Validators only: the exceptions and warnings they raise are defined in :mod:`sdelip.errors`
(imported here, so ``from sdelip._checks import NonFiniteError`` keeps working).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .errors import DegenerateSpectrumError, DegenerateSpectrumWarning, NonFiniteError  # noqa: F401  (defined there, re-exported)


def _where(name: Optional[str]) -> str:
    return f" for layer {name!r}" if name else ""


def check_matrix(W: torch.Tensor, arg: str = "W", name: Optional[str] = None) -> None:
    """Check that ``W`` is a finite floating-point matrix of shape (m, n)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{arg}{_where(name)} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(
            f"{arg}{_where(name)} must be a matrix of shape (m, n), got shape {tuple(W.shape)}; "
            "reshape Conv2d weights with sdelip.core.spectral.weight_matrix"
        )
    if not W.is_floating_point():
        raise TypeError(f"{arg}{_where(name)} must be floating point, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{arg}{_where(name)} is empty (shape {tuple(W.shape)})")
    check_finite(W, arg, name)


def check_finite(x: torch.Tensor, arg: str, name: Optional[str] = None, step: Optional[int] = None) -> None:
    """Raise :class:`NonFiniteError` naming ``arg``, the layer and the step if ``x`` has NaN/Inf.

    A NaN or Inf anywhere makes the sum non-finite, so a finite sum settles it in one
    reduction (80× faster than ``isfinite(x).all()`` on a 512 × 4608 matrix, one thread); a
    sum that overflows only sends it to the elementwise check.
    """
    if x.is_floating_point() and x.numel() and math.isfinite(float(x.sum())):
        return
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


# -- the arguments of the public entry points: Tracker, Tracker.backward, TrainConfig ----------------
def check_module(model) -> None:
    """Check that ``model`` is a ``torch.nn.Module``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_choice(value, arg: str, choices: tuple) -> None:
    """Check that ``value`` is one of ``choices``: ``arg must be 'a', 'b' or 'c', got …``."""
    if value not in choices:
        names = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"{arg} must be {names}, got {value!r}")


def check_one_of(value, arg: str, choices) -> None:
    """Check that ``value`` is one of ``choices``: ``arg must be one of a, b, got …``."""
    if value not in choices:
        raise ValueError(f"{arg} must be one of {', '.join(choices)}, got {value!r}")


def check_optional_positive_int(value, arg: str) -> Optional[int]:
    """A positive integer (returned as ``int``) or None; a bool is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or int(value) < 1:
        raise ValueError(f"{arg} must be a positive integer or None, got {value!r}")
    return int(value)


def check_non_negative_int(value, arg: str) -> int:
    """A non-negative integer (returned as ``int``); a bool is refused."""
    if isinstance(value, bool) or int(value) < 0:
        raise ValueError(f"{arg} must be a non-negative integer, got {value!r}")
    return int(value)


def check_positive_int(value, arg: str) -> int:
    """A positive ``int`` (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    return value


def check_positive_number(value, arg: str) -> None:
    """A positive finite ``int`` or ``float`` (a string or a tensor is refused, not converted)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{arg} must be a positive finite number, got {value!r}")


def check_tracked_batch_size(batch_size: int, track: bool) -> None:
    """A tracked run needs mini-batches of at least 2 samples (Prop 5 divides by M − 1)."""
    if batch_size < 2 and track:
        raise ValueError(
            f"batch_size = {batch_size}: tracking needs at least 2 samples per step "
            "(the gradient-noise estimator of Prop 5 divides by M − 1)"
        )


def check_device(device: str) -> None:
    """A CUDA device is asked for only where CUDA is available."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")


def check_engine_loss_fn(engine: str, loss_fn) -> None:
    """The materialised engine recomputes the per-sample losses: it needs ``loss_fn``."""
    if engine == "materialised" and loss_fn is None:
        raise ValueError(
            "the materialised engine needs loss_fn(outputs, targets) -> per-sample losses, e.g. "
            "loss_fn=functools.partial(F.cross_entropy, reduction='none'), and batch=(x, y) in backward()"
        )


def check_losses(losses, step: int) -> None:
    """The per-sample losses of ``tracker.backward``: a finite (M,) tensor that requires grad.

    Raises:
        TypeError: not a tensor.
        ValueError: a scalar, another shape, or no gradient.
        NonFiniteError: NaN/Inf in a loss (naming the step and the samples).
    """
    if not isinstance(losses, torch.Tensor):
        raise TypeError(
            f"tracker.backward needs the per-sample losses as a tensor of shape (M,), got {type(losses).__name__}"
        )
    if losses.ndim == 0:
        raise ValueError(
            f"tracker.backward got a scalar loss at step {step}; it needs the per-sample losses, a tensor of "
            "shape (M,): compute the loss with reduction='none', e.g. "
            "losses = F.cross_entropy(model(x), y, reduction='none'), and pass that — the tracker takes the "
            "mean for the backward itself"
        )
    if losses.ndim != 1:
        raise ValueError(
            f"tracker.backward needs one loss per sample, shape (M,), got shape {tuple(losses.shape)} at step "
            f"{step}; reduce the other axes per sample first, e.g. losses.reshape(M, -1).mean(1)"
        )
    if not losses.requires_grad:
        raise ValueError(
            f"the losses passed at step {step} do not require grad: compute them from the model's output "
            "with gradients enabled"
        )
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()
        vals = losses.detach()[bad[:5]].tolist()
        raise NonFiniteError(
            f"the loss at step {step} is not finite for {bad.numel()} of {losses.shape[0]} samples "
            f"(samples {bad[:5].tolist()}, values {vals}); nothing was recorded for this step and no backward "
            "was run"
        )


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


# -- the SDE systems (sdelip.sde: ParameterSDE, LipschitzSDE) ------------------------------


def check_sde_lr(lr, owner: str = "ParameterSDE") -> float:
    """The learning rate η of an SDE system: required, positive and finite."""
    if lr is None:
        raise TypeError(f"{owner} needs the learning rate lr (η)")
    return check_positive(lr, "lr")


def check_sde_sampling(sampling: str, noise_coupling: Optional[str]) -> str:
    """Check ``sampling`` and ``noise_coupling``; returns the coupling (default: "layers", "shared" reshuffled)."""
    if sampling not in ("iid", "reshuffle"):
        raise ValueError(f"sampling must be 'iid' (independent mini-batches) or 'reshuffle', got {sampling!r}")
    if noise_coupling is None:
        noise_coupling = "shared" if sampling == "reshuffle" else "layers"
    if noise_coupling not in ("layers", "shared"):
        raise ValueError(f"noise_coupling must be 'layers' (Assumption 3) or 'shared', got {noise_coupling!r}")
    if sampling == "reshuffle" and noise_coupling != "shared":
        raise NotImplementedError(
            "sampling='reshuffle' drives every layer with the one N-dimensional epoch-pinned Brownian motion "
            "(one permutation moves all layers): use noise_coupling='shared' (the default with reshuffle)"
        )
    return noise_coupling


def check_sde_engine(engine: str) -> str:
    """The engine of an SDE system, normalised: "auto", "factored" or "materialised"."""
    engine = str(engine).lower()
    if engine not in ("auto", "factored", "materialised", "materialized"):
        raise ValueError(f"engine must be 'auto', 'factored' or 'materialised', got {engine!r}")
    return "materialised" if engine == "materialized" else engine


def check_sde_gradient_fn(sampling: str, engine: str, noise_batch_size: Optional[int]) -> None:
    """A user's ``gradient_fn`` returns per-sample gradients of M samples: iid sampling, materialised engine."""
    if sampling == "reshuffle":
        raise ValueError("sampling='reshuffle' needs the training data (its noise runs over all N samples), "
                         "not a gradient_fn")
    if engine == "factored":
        raise ValueError("a gradient_fn returns per-sample gradients: it needs engine='materialised'")
    if noise_batch_size is None:
        raise TypeError("gradient_fn needs noise_batch_size (M, the number of per-sample gradients)")


def check_sde_reshuffle_data(grad_source: str, data, M: int, max_cached: int) -> None:
    """Reshuffled sampling: a full-set drift on a materialisable map-style training set, 2 <= M <= N."""
    if grad_source == "batch":
        raise ValueError("sampling='reshuffle' computes the drift on the whole training set, in the pass "
                         "that gives the noise: grad_source must be 'full' or 'auto'")
    if not data.sized or data.full() is None:
        raise ValueError(f"sampling='reshuffle' needs a map-style training set small enough to "
                         f"materialise (at most max_cached = {max_cached} samples)")
    if not 2 <= int(M) <= len(data):
        raise ValueError(f"sampling='reshuffle' needs 2 <= M <= N, got M = {M}, N = {len(data)}")


def check_sde_factored_layers(engine: str, tied: list, other: list) -> None:
    """The factored noise needs each tracked weight applied once, as its module's .weight, by its own forward."""
    if engine == "factored" and tied:
        t = tied[0]
        raise ValueError(
            f"layer {t.name!r} applies its weight {t.uses} times (modules {(t.name, *t.aliases)}): the factored "
            "noise needs each weight used by one call of one module; use engine='materialised' (or 'auto')"
        )
    if engine == "factored" and other:
        t = other[0]
        raise ValueError(
            f"layer {t.name!r} ({t.kind}, rule {t.rule.name!r}) is not applied as its module's .weight by the "
            "module's own forward, which the factored noise needs; use engine='materialised' (or 'auto')"
        )


def check_sde_noise_batch(M: int) -> None:
    """The noise mini-batch of an SDE system needs M >= 2 (Prop 5 divides by M − 1)."""
    if M < 2:
        raise ValueError(f"the noise mini-batch needs M >= 2 samples (Prop 5 divides by M − 1), got {M}")


def check_drift_noise(dt: float, lr: float, M: int, B: int) -> float:
    """(dt/η)·M/B, the step covariance a batch drift of B samples adds, in units of SGD's; refused at >= 1."""
    excess = dt / lr * M / B
    if excess >= 1.0:
        raise ValueError(
            f"grad_source='batch' with grad_batch_size B = {B} and noise_batch_size M = {M}: the drift "
            f"estimate alone adds (dt/η)·M/B = {excess:.3g} ≥ 1 times the step covariance of SGD, which no "
            f"diffusion can compensate; use B > {math.floor(M * dt / lr)}, grad_source='full', "
            "or compensate_drift_noise=False"
        )
    return excess


def check_lipschitz_sde_sampling(sampling: str) -> None:
    """LipschitzSDE's log K rows are those of iid mini-batches (Thm 14): reshuffled sampling is refused."""
    if sampling == "reshuffle":
        raise NotImplementedError(
            "LipschitzSDE with sampling='reshuffle' would need the log K rows over all N samples; simulate "
            "ParameterSDE(..., sampling='reshuffle') and read K = Π σ1(θ) with direct_lipschitz, or the reduced "
            "system ReducedLipschitzSDE(..., steps_per_epoch=, batch_fraction=)"
        )


def check_lipschitz_sde_options(integrate, allowed: tuple, decomposition: str) -> tuple:
    """LipschitzSDE's ``integrate`` (term names among ``allowed``, returned as a tuple) and ``decomposition``."""
    integrate = (integrate,) if isinstance(integrate, str) else tuple(integrate)
    bad = [k for k in integrate if k not in allowed]
    if bad:
        raise ValueError(f"integrate takes term names among {allowed}, got {bad}")
    check_choice(decomposition, "decomposition", ("auto", "fast", "svd"))
    return integrate
