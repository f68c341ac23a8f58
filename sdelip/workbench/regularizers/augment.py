"""AutoAugment transforms (Table 3)."""

from __future__ import annotations



_AUTOAUGMENT_POLICY = {"cifar10": "CIFAR10", "cifar-standin": "CIFAR10", "cifar100": "CIFAR100"}


def autoaugment_transform(dataset_name: str):
    """``torchvision.transforms.AutoAugment`` with the policy of Table 3 for the dataset.

    CIFAR10 policy for ``"cifar10"`` and ``"cifar-standin"``. For ``"cifar100"`` Table 3
    names ``AutoAugmentPolicy.CIFAR100``, which torchvision does not define; the
    CIFAR-10 policy is used instead (as the AutoAugment paper does for CIFAR-100).
    Pass the result as ``transform`` to :func:`sdelip.workbench.data.load_dataset`; it acts on
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
