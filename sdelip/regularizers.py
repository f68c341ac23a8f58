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

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

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
    :class:`sdelip.data.Normalization`, e.g. ``DatasetInfo.normalization``) is given:
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


def _original_targets(dataset: Dataset) -> torch.Tensor:
    if isinstance(dataset, Subset):
        return _original_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.int64).clone()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


class CorruptedLabels(Dataset):
    """Uniform label corruption of Sec 8.5, fixed once per dataset.

    Independently for each index, with probability ε the label is replaced by a draw
    from U{0, …, C−1} (all classes, so the new label equals the old one with
    probability 1/C); otherwise it is kept. The draws come from a
    ``torch.Generator`` seeded with ``seed`` and are fixed at construction: the same
    index always returns the same label. Expected fraction of *changed* labels:
    ε(1 − 1/C).

    Args:
        dataset: a map-style dataset returning ``(x, label)``.
        eps: corruption probability ε in [0, 1].
        num_classes: C.
        seed: the corruption seed.

    Attributes:
        corrupted_mask: bool (N,): the label was redrawn (it may coincide with the original).
        new_labels: int64 (N,): the redrawn labels (meaningful where ``corrupted_mask``).
    """

    def __init__(self, dataset: Dataset, eps: float, num_classes: int, seed: int = 0):
        if not (_finite(eps) and 0.0 <= float(eps) <= 1.0):
            raise ValueError(f"label corruption eps must lie in [0, 1], got {eps!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.dataset = dataset
        self.eps = float(eps)
        self.num_classes = num_classes
        self.seed = int(seed)
        n = len(dataset)
        gen = torch.Generator().manual_seed(self.seed)
        self.corrupted_mask = torch.rand(n, generator=gen, dtype=torch.float64) < self.eps
        self.new_labels = torch.randint(0, num_classes, (n,), generator=gen)
        self._targets: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def corrupted_indices(self) -> torch.Tensor:
        """Indices whose label was redrawn."""
        return self.corrupted_mask.nonzero().flatten()

    @property
    def original_targets(self) -> torch.Tensor:
        """The labels of the wrapped dataset (int64 (N,))."""
        return _original_targets(self.dataset)

    @property
    def targets(self) -> torch.Tensor:
        """The labels after corruption (int64 (N,))."""
        if self._targets is None:
            self._targets = torch.where(self.corrupted_mask, self.new_labels, self.original_targets)
        return self._targets

    @property
    def changed_mask(self) -> torch.Tensor:
        """bool (N,): the returned label differs from the original."""
        return self.targets != self.original_targets

    def _label(self, index: int, label) -> int:
        return int(self.new_labels[index]) if bool(self.corrupted_mask[index]) else int(label)

    def __getitem__(self, index: int):
        x, label = self.dataset[index]
        return x, self._label(index, label)

    def __getitems__(self, indices):
        """Batched access used by ``DataLoader`` (forwards to the wrapped dataset's)."""
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        return [(x, self._label(i, label)) for i, (x, label) in zip(indices, items)]


def with_label_corruption(info, eps: float, seed: int = 0):
    """A copy of a :class:`sdelip.data.DatasetInfo` whose dataset has corrupted labels.

    Returns ``info`` itself when ``eps == 0``.
    """
    if eps == 0:
        return info
    ds = CorruptedLabels(info.dataset, eps, info.num_classes, seed)
    return attrs.evolve(info, dataset=ds, source=f"{info.source}; labels uniformly corrupted with eps={eps:g} (seed {seed})")


# ---------------------------------------------------------------------------------------
# AutoAugment
# ---------------------------------------------------------------------------------------

# Table 3 lists AutoAugmentPolicy.CIFAR10 and AutoAugmentPolicy.CIFAR100, but torchvision
# has no CIFAR100 policy (its members are IMAGENET, CIFAR10 and SVHN). The AutoAugment
# paper (Cubuk et al., 2019) applies the policy learned on reduced CIFAR-10 to CIFAR-100,
# so that is what "cifar100" gets here; a CIFAR100 member is used if torchvision ever has one.
_AUTOAUGMENT_POLICY = {"cifar10": "CIFAR10", "cifar-standin": "CIFAR10", "cifar100": "CIFAR100"}


def autoaugment_transform(dataset_name: str):
    """``torchvision.transforms.AutoAugment`` with the policy of Table 3 for the dataset.

    CIFAR10 policy for ``"cifar10"`` and ``"cifar-standin"``. For ``"cifar100"`` Table 3
    names ``AutoAugmentPolicy.CIFAR100``, which torchvision does not define; the
    CIFAR-10 policy is used instead (as the AutoAugment paper does for CIFAR-100).
    Pass the result as ``transform`` to :func:`sdelip.data.load_dataset`; it acts on
    uint8 images (PIL or tensor) before normalisation and draws from the global torch
    RNG.
    """
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    key = str(dataset_name).strip().lower()
    if key.startswith("cifar-standin"):
        key = "cifar-standin"
    if key not in _AUTOAUGMENT_POLICY:
        raise ValueError(
            f"no AutoAugment policy for dataset {dataset_name!r}: Table 3 uses it on "
            f"{', '.join(_AUTOAUGMENT_POLICY)} only"
        )
    policy = getattr(AutoAugmentPolicy, _AUTOAUGMENT_POLICY[key], AutoAugmentPolicy.CIFAR10)
    return AutoAugment(policy=policy)
