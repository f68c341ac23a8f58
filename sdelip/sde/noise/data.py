"""The data of the SDE systems: mini-batches drawn reproducibly from a loader, a dataset or tensors."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DataSource"]


def _split_xy(batch):
    if isinstance(batch, dict):
        raise TypeError("data batches must be (inputs, targets) pairs, got a dict")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"data batches must be (inputs, targets) pairs, got {type(batch).__name__}")
    return batch[0], batch[1]


class DataSource:
    """Draws i.i.d. samples from a training set, reproducibly.

    Samples are drawn with replacement (i.i.d., as the CLT behind Def 4 and Prop 5
    assumes: Σ = Var[g]/M exactly), from an own seeded generator, so the loader's
    shuffling plays no part. A map-style dataset with at most ``max_cached`` samples
    is materialised once as tensors (random augmentations are then frozen); larger
    ones are indexed and collated per draw; an iterable dataset is read in order.

    Args:
        data: a ``DataLoader``, a map-style ``Dataset`` of (x, y) pairs, or a tuple
            (X, Y) of tensors with the samples along dimension 0.
        max_cached: largest dataset materialised in memory.
        seed: seed of the sampling generator.
    """

    def __init__(self, data, max_cached: int = 50_000, seed: int = 0):
        self.batch_size: Optional[int] = None
        self._loader = None
        self._iter = None
        self._collate = torch.utils.data.default_collate
        self._X = self._Y = None
        self._dataset = None
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            X, Y = data
            if len(X) != len(Y):
                raise ValueError(f"X and Y have {len(X)} and {len(Y)} samples")
            self._X, self._Y = X, Y
        else:
            if isinstance(data, torch.utils.data.DataLoader):
                self._loader = data
                self.batch_size = data.batch_size
                if data.collate_fn is not None:
                    self._collate = data.collate_fn
                dataset = data.dataset
            else:
                dataset = data
            iterable = isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__")
            if iterable:
                if self._loader is None:
                    raise TypeError("an iterable dataset must be passed as a DataLoader")
            else:
                self._dataset = dataset
                if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) == 2:
                    self._X, self._Y = dataset.tensors
                elif len(dataset) <= max_cached:
                    self._X, self._Y = _split_xy(self._collate_indices(range(len(dataset))))
                    self._dataset = None
        self._gen = torch.Generator()
        self.reseed(seed)
        self._device_cache: dict = {}

    def reseed(self, seed: int) -> None:
        """Restart the sampling generator from ``seed``."""
        self._gen.manual_seed(int(seed) % (1 << 63))

    def __len__(self) -> int:
        if self._X is not None:
            return len(self._X)
        if self._dataset is not None:
            return len(self._dataset)
        raise TypeError("the number of samples of an iterable dataset is unknown")

    @property
    def sized(self) -> bool:
        return self._X is not None or self._dataset is not None

    def _collate_indices(self, idx):
        ds = self._dataset if self._dataset is not None else self._loader.dataset
        idx = list(idx)
        items = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
        return self._collate(items)

    def _on(self, X, Y, device, dtype):
        X = X.to(device)
        if X.is_floating_point() and dtype is not None:
            X = X.to(dtype)
        return X, Y.to(device)

    def full(self, device=None, dtype=None):
        """The whole training set (X, Y) on ``device`` (None if it is not materialised)."""
        if self._X is None:
            return None
        key = (str(device), dtype)
        if key not in self._device_cache:
            self._device_cache = {key: self._on(self._X, self._Y, device, dtype)}
        return self._device_cache[key]

    def example(self, device=None, dtype=None):
        """One sample (x[None], y[None]) for shapes, without advancing the sampling generator."""
        if self._X is not None:
            X, Y = self._X[:1], self._Y[:1]
        elif self._dataset is not None:
            X, Y = _split_xy(self._collate_indices([0]))
        else:
            X, Y = _split_xy(next(iter(self._loader)))
            X, Y = X[:1], Y[:1]
        return self._on(X, Y, device, dtype)

    def sample(self, M: int, n: Optional[int] = None, device=None, dtype=None):
        """M i.i.d. samples (leading shape (M,)), or n independent sets (n, M).

        Args:
            M: samples per set.
            n: number of independent sets, or None for one set.
            device, dtype: where to put the inputs (floating inputs are cast to dtype).
        """
        shape = (M,) if n is None else (n, M)
        total = M if n is None else n * M
        if self.sized:
            idx = torch.randint(len(self), (total,), generator=self._gen)
            if self._X is not None:
                X, Y = self._X[idx], self._Y[idx]
            else:
                X, Y = _split_xy(self._collate_indices(idx.tolist()))
        else:
            xs, ys, got, fresh = [], [], 0, False
            while got < total:
                if self._iter is None:
                    self._iter, fresh = iter(self._loader), True
                try:
                    xb, yb = _split_xy(next(self._iter))
                except StopIteration:
                    self._iter = None
                    if fresh:
                        raise ValueError("the data loader yields no batches") from None
                    continue
                fresh = False
                xs.append(xb)
                ys.append(yb)
                got += len(xb)
            X, Y = torch.cat(xs)[:total], torch.cat(ys)[:total]
        X = X.reshape(*shape, *X.shape[1:])
        Y = Y.reshape(*shape, *Y.shape[1:])
        return self._on(X, Y, device, dtype)
