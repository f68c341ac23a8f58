"""Noisy gradients of Sec 8.4: an isotropic perturbation added to the mini-batch gradient."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from ._checks import NOISE_KINDS, _finite
from .config import RegularizerConfig


class NoisyGradient:
    """Noisy gradient injection of Sec 8.4: ∇L_* = √ρ ∇L_f + √(1−ρ) n.

    Use per step::

        losses = noisy.scale_losses(losses)      # per-sample losses × √ρ (seen by the tracker)
        losses.mean().backward()
        noisy.inject(model.parameters())         # .grad += √(1−ρ) n,  n iid per element
        optimizer.step()

    Scaling the per-sample losses scales every per-sample and batch gradient by √ρ,
    so μ → √ρ μ and the mini-batch covariance → ρ Σ. The injected noise is independent
    of the data and adds the isotropic covariance :attr:`noise_variance` · I to the
    batch-gradient covariance: Σ_* = ρ Σ_f + (1 − ρ) Var(n) I.

    Args:
        rho: ρ in [0, 1].
        noise: ``"gaussian"`` (N(0, 1)), ``"uniform"`` (U[−0.5, 0.5]) or ``"zero"``.
        generator: CPU ``torch.Generator`` for the noise; None uses the global RNG.
    """

    def __init__(self, rho: float, noise: str = "gaussian", generator: Optional[torch.Generator] = None):
        if not (_finite(rho) and 0.0 <= float(rho) <= 1.0):
            raise ValueError(f"noisy-gradient rho must lie in [0, 1], got {rho!r}")
        if noise not in NOISE_KINDS:
            raise ValueError(f"noisy-gradient noise must be one of {', '.join(NOISE_KINDS)}, got {noise!r}")
        self.rho = float(rho)
        self.noise = noise
        self.generator = generator

    @classmethod
    def from_config(
        cls, config: RegularizerConfig, generator: Optional[torch.Generator] = None
    ) -> Optional["NoisyGradient"]:
        """The injector configured by ``config``, or None when ``noisy_gradient_rho`` is None."""
        if config.noisy_gradient_rho is None:
            return None
        return cls(config.noisy_gradient_rho, config.noisy_gradient_noise, generator)

    @property
    def loss_scale(self) -> float:
        """√ρ, the factor on the signal loss and its gradients."""
        return math.sqrt(self.rho)

    @property
    def noise_scale(self) -> float:
        """√(1 − ρ), the factor on the injected noise."""
        return math.sqrt(1.0 - self.rho)

    @property
    def noise_variance(self) -> float:
        """(1 − ρ)·Var(n): the isotropic variance σ_n² added to Σ per parameter entry."""
        return (1.0 - self.rho) * NOISE_KINDS[self.noise]

    def scale_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """Per-sample losses multiplied by √ρ."""
        return losses * self.loss_scale

    def sample(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One draw of the unscaled noise n with the given shape (CPU)."""
        gen = self.generator
        if self.noise == "zero":
            return torch.zeros(shape, dtype=dtype)
        if self.noise == "gaussian":
            return torch.randn(shape, generator=gen, dtype=dtype)
        return torch.rand(shape, generator=gen, dtype=dtype) - 0.5

    def inject(self, params: Iterable[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """Add √(1−ρ)·n to the ``.grad`` of every parameter, after ``backward``.

        Parameters whose ``.grad`` is None (not reached by the loss) are skipped.
        With ρ = 1 or zero noise nothing is added and no random number is drawn.

        Returns:
            The added tensors (None for skipped parameters), e.g. for logging.
        """
        added: list[Optional[torch.Tensor]] = []
        scale = self.noise_scale
        for p in params:
            if p.grad is None:
                added.append(None)
                continue
            if scale == 0.0 or self.noise == "zero":
                added.append(torch.zeros_like(p.grad))
                continue
            n = self.sample(p.grad.shape, p.grad.dtype).to(p.grad.device).mul_(scale)
            p.grad.add_(n)
            added.append(n)
        return added


# ---------------------------------------------------------------------------------------
# Uniform label corruption (Sec 8.5)
# ---------------------------------------------------------------------------------------
