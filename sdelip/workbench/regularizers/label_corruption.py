"""Label corruption of Sec 8.5."""

from __future__ import annotations

from typing import Optional

import attrs
import torch
from torch.utils.data import Dataset, Subset

from ._checks import _finite


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
    """A copy of a :class:`sdelip.workbench.data.DatasetInfo` whose dataset has corrupted labels.

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
