"""Per-sample losses with mixup, label smoothing and FGSM adversarial training (Table 3)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import _finite
from .config import RegularizerConfig


def draw_mixup(batch_size: int, alpha: float, generator: Optional[torch.Generator] = None) -> tuple[float, torch.Tensor]:
    """Draw the mixup coefficient λ ~ Beta(α, α) and the partner permutation.

    Draw order (fixed, so that a copy of the generator reproduces it): one int64 from
    ``generator`` seeds a NumPy ``Generator`` that draws λ (torch's Beta sampler does
    not accept a generator), then ``torch.randperm(batch_size, generator=generator)``.

    Args:
        batch_size: M.
        alpha: the Beta parameter α > 0 (paper: 0.4).
        generator: a CPU ``torch.Generator``; None uses the global one.

    Returns:
        ``(lam, perm)``: a Python float in [0, 1] and an int64 permutation of range(M).
    """
    if not (_finite(alpha) and alpha > 0):
        raise ValueError(f"mixup alpha must be a positive finite number, got {alpha!r}")
    gen = generator if generator is not None else torch.default_generator
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(batch_size, generator=gen)
    return lam, perm


def fgsm_perturb(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    eps: float,
    normalization=None,
) -> torch.Tensor:
    """FGSM adversarial example x_adv = x + ε · sign(∇_x Σ_i ℓ_i) (Goodfellow et al., 2015).

    The input gradient is taken with ``torch.autograd.grad`` with respect to a detached
    copy of ``x`` only, so no gradient is accumulated on the parameters. The result is
    detached: adversarial training treats x_adv as data.

    Units: ``eps`` is in **pixel units** (images in [0, 1]) when ``normalization`` (a
    :class:`sdelip.workbench.data.Normalization`, e.g. ``DatasetInfo.normalization``) is given:
    the step in the normalised input space is ε/std_c on channel c — exactly ε per pixel
    in [0, 1] units — and x_adv is clipped to the valid pixel range [0, 1] (in normalised
    coordinates). Without ``normalization`` ε is in the units of ``x`` and nothing is
    clipped.

    Args:
        model: the network.
        x: the (normalised) input batch, shape (M, C, ...).
        loss_fn: maps logits to per-sample losses (M,).
        eps: the FGSM step ε > 0 (paper: 0.03).
        normalization: optional per-channel mean/std of the input normalisation.

    Returns:
        The adversarial batch, same shape and dtype as ``x``, without grad history.
    """
    if not (_finite(eps) and eps > 0):
        raise ValueError(f"FGSM eps must be a positive finite number, got {eps!r}")
    x_req = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        losses = loss_fn(model(x_req))
        (grad,) = torch.autograd.grad(losses.sum(), x_req)
    direction = grad.sign()
    if normalization is None:
        return (x.detach() + eps * direction).detach()
    mean, std = normalization.as_tensors(dtype=x.dtype)
    mean, std = mean.to(x.device), std.to(x.device)
    if x.ndim < 2 or x.shape[1] != std.shape[0]:
        raise ValueError(
            f"normalization has {std.shape[0]} channels but the input has shape {tuple(x.shape)} "
            "(expected (M, C, H, W))"
        )
    x_adv = x.detach() + (eps / std) * direction
    lo, hi = (0.0 - mean) / std, (1.0 - mean) / std
    return torch.maximum(torch.minimum(x_adv, hi), lo).detach()


def per_sample_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: Optional[RegularizerConfig] = None,
    generator: Optional[torch.Generator] = None,
    normalization=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample training losses (M,) under the loss-level regularizers of ``config``.

    In order:

    1. **Base loss**: ℓ(z, y) = cross-entropy with label smoothing ε
       (``F.cross_entropy(reduction="none", label_smoothing=ε)``), i.e.
       (1 − ε)·CE(z, y) + ε·mean_k(−log softmax(z)_k).
    2. **Mixup** (``mixup_alpha``): λ ~ Beta(α, α) once per batch and a permutation π
       (:func:`draw_mixup`); input x̃ = λ x + (1 − λ) x_π and
       ℓ_i = λ ℓ(z_i, y_i) + (1 − λ) ℓ(z_i, y_{π(i)}) with z = model(x̃).
    3. **FGSM** (``fgsm_eps``): the (mixed) input is replaced by its FGSM example
       under the same per-sample loss (:func:`fgsm_perturb`; ε in pixel units when
       ``normalization`` is given), and the network is trained on it only.

    Noisy gradients (:class:`NoisyGradient`), weight decay (:func:`make_optimizer`),
    label corruption and augmentation act elsewhere; they are not applied here.

    Args:
        model: the network (its mode — train/eval — is left unchanged).
        x: input batch (M, ...).
        y: integer labels (M,).
        config: the regularizers; None means none.
        generator: CPU ``torch.Generator`` for the mixup draws; None uses the global RNG.
        normalization: the input normalisation (``DatasetInfo.normalization``) giving
            FGSM's ε in pixel units.

    Returns:
        ``(losses, logits)``: per-sample losses of shape (M,) with grad history, and
        the logits of the forward pass they were computed from.
    """
    config = RegularizerConfig() if config is None else config
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    ls = float(config.label_smoothing)

    def base(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction="none", label_smoothing=ls)

    if config.mixup_alpha is not None:
        lam, perm = draw_mixup(x.shape[0], config.mixup_alpha, generator)
        perm = perm.to(x.device)
        x_in = lam * x + (1.0 - lam) * x[perm]
        y_perm = y[perm]

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            return lam * base(logits, y) + (1.0 - lam) * base(logits, y_perm)

    else:
        x_in = x

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            return base(logits, y)

    if config.fgsm_eps is not None:
        x_in = fgsm_perturb(model, x_in, loss_fn, config.fgsm_eps, normalization)
    logits = model(x_in)
    return loss_fn(logits), logits


# ---------------------------------------------------------------------------------------
# Weight decay
# ---------------------------------------------------------------------------------------
