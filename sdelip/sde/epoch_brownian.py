"""An epoch-pinned Brownian motion on the step grid: the driver of reshuffled SGD's noise.

SGD with reshuffled epochs (a fresh permutation per epoch, mini-batches of M samples
without replacement within it; every ``DataLoader(shuffle=True)``) has, at fixed θ,
mini-batch noise that sums to zero over an epoch (docs/sde.md, "Reshuffled epochs";
docs/theory.md §10). Its continuous-time model (Perko 2025, "Towards continuous-time
approximations for SGD without replacement") drives the noise by a Brownian motion that
is pinned within each epoch. :class:`EpochBrownian` is that driver on the Euler grid
t_k = t0 + k·dt, with the torchsde interface of :class:`~sdelip.sde.GridBrownian`:

- epoch e covers the grid steps [e·S, (e+1)·S) (S = ``steps_per_epoch``);
- within an epoch every coordinate's increments ΔW_0, …, ΔW_{S−1} are jointly Gaussian
  with mean 0 and

      Cov(ΔW_j, ΔW_k) = dt (δ_jk − α),          α = ``batch_fraction`` (default 1/S);

  for α = 1/S (S·M = N: the epoch uses every sample) this is the Brownian bridge on
  the epoch's grid: Var ΔW_j = dt(1 − 1/S), Cov = −dt/S, and Σ_j ΔW_j = 0 exactly.
  For α < 1/S (the remainder N − S·M of the samples dropped each epoch) the epoch sum
  has variance S·dt·(1 − α·S), as the dropped samples' share of the noise;
- coordinates are independent, and so are different epochs.

Construction: ΔW_j = √dt (Z_j − γ Σ_i Z_i) with Z i.i.d. N(0, 1) and
γ = (1 − √(1 − αS))/S, which gives Cov = dt(δ_jk − 2γ + γ²S) = dt(δ_jk − α).

The draws Z of epoch e come in blocks of steps, each from a generator seeded by
(seed, stream, e, block): any grid interval is reproducible in any order, without
storing the path. The epoch sum Σ Z is computed once per epoch (one pass over the
epoch's blocks; the last two epochs' sums are cached), so memory is one block plus
two increments, never the epoch's S increments at once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .brownian import GridBrownian

__all__ = ["EpochBrownian", "pinned_gamma"]

#: Target size in bytes of one block of draws.
_BLOCK_BYTES = 1 << 20


def pinned_gamma(steps_per_epoch: int, batch_fraction: float) -> float:
    """γ = (1 − √(1 − α S))/S: ΔW_j = √dt (Z_j − γ Σ Z) has Cov dt (δ_jk − α) within an epoch."""
    S, a = int(steps_per_epoch), float(batch_fraction)
    return (1.0 - math.sqrt(max(0.0, 1.0 - a * S))) / S


def _epoch_seed(seed: int, stream: int, epoch: int, block: int) -> int:
    s = int(seed) % (1 << 64)
    state = np.random.SeedSequence([s & 0xFFFFFFFF, s >> 32, int(stream) % (1 << 32), int(epoch) % (1 << 32),
                                    int(epoch) >> 32, int(block), 0xE90C])
    words = state.generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class EpochBrownian(GridBrownian):
    """A Brownian motion pinned within each epoch of S grid steps (see the module docstring).

    ``bm(ta, tb)`` returns the sum of the increments of the grid steps in [ta, tb),
    shape ``size``; use it with ``torchsde.sdeint(..., bm=bm, method="euler")`` at a
    solver step equal to the grid step (one SGD step), so that each Euler step takes one
    increment.

    Args:
        t0: the start of the grid (and of epoch 0).
        dt: the grid step (the learning rate η for SGD time).
        size: shape of one increment, (batch, noise_channels) for sdeint.
        steps_per_epoch: S, the steps of one epoch (⌊N / M⌋ for N samples in batches of M).
        batch_fraction: α = M/N (default 1/S, the bridge). Needs 0 < α S ≤ 1.
        seed: global seed.
        stream: stream index (independent streams, e.g. one per chunk of trajectories).
        n_steps: optional number of grid steps; queries beyond it raise.
        dtype, device: of the increments (CUDA increments are drawn on the GPU).
        block_steps: steps per block of draws (default about 1 MiB, at most S). The path
            depends on it; keep it fixed to reproduce a path.
        tol: how far, in steps, a query may sit from the grid.
        on_block: optional callback ``on_block(n_new_steps)`` when a block of increments
            is first drawn (progress bars).
    """

    def __init__(
        self,
        t0: float,
        dt: float,
        size: Union[int, Sequence[int]],
        steps_per_epoch: int,
        batch_fraction: Optional[float] = None,
        seed: int = 0,
        stream: int = 0,
        n_steps: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
        block_steps: Optional[int] = None,
        tol: float = 1e-3,
        on_block: Optional[Callable[[int], None]] = None,
    ):
        S = int(steps_per_epoch)
        if S < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}")
        alpha = 1.0 / S if batch_fraction is None else float(batch_fraction)
        if not (alpha > 0 and alpha * S <= 1 + 1e-12):
            raise ValueError(
                f"batch_fraction α = {batch_fraction!r} with steps_per_epoch S = {S}: need 0 < α·S <= 1 "
                f"(α = M/N, S = ⌊N/M⌋), got α·S = {alpha * S!r}"
            )
        super().__init__(t0, dt, size, seed=seed, stream=stream, n_steps=n_steps, dtype=dtype, device=device,
                         block_steps=1, tol=tol, on_block=on_block)
        numel = max(1, self._size.numel())
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        if block_steps is None:
            block_steps = max(1, _BLOCK_BYTES // (numel * itemsize))
        if int(block_steps) < 1:
            raise ValueError(f"block_steps must be >= 1, got {block_steps!r}")
        self._block_steps = min(int(block_steps), S)
        self.steps_per_epoch = S
        self.batch_fraction = alpha
        self.gamma = pinned_gamma(S, alpha)
        self._raw_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._sum_cache: "OrderedDict[int, torch.Tensor]" = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"EpochBrownian(t0={self._t0}, dt={self._dt}, size={tuple(self._size)}, "
            f"steps_per_epoch={self.steps_per_epoch}, batch_fraction={self.batch_fraction:.6g}, seed={self._seed}, "
            f"stream={self._stream}, block_steps={self._block_steps}, dtype={self._dtype}, device={self._device})"
        )

    # -- draws -------------------------------------------------------------------------
    def _raw(self, epoch: int, block: int, notify: bool = True) -> torch.Tensor:
        """√dt Z for the steps of ``block`` of ``epoch``: (steps, *size)."""
        key = (epoch, block)
        blk = self._raw_cache.get(key)
        if blk is not None:
            return blk
        B, S = self._block_steps, self.steps_per_epoch
        steps = min(B, S - block * B)
        gen = torch.Generator(device=self._device)
        gen.manual_seed(_epoch_seed(self._seed, self._stream, epoch, block))
        blk = torch.empty((steps, *self._size), dtype=self._dtype, device=self._device)
        blk.normal_(0.0, self._sqrt_dt, generator=gen)
        if notify:
            self._raw_cache[key] = blk
            while len(self._raw_cache) > 2:
                self._raw_cache.popitem(last=False)
            if self.on_block is not None:
                self.on_block(steps)
        return blk

    def _epoch_sum(self, epoch: int) -> torch.Tensor:
        """γ √dt Σ_j Z_j of ``epoch`` (what every increment of the epoch subtracts)."""
        s = self._sum_cache.get(epoch)
        if s is not None:
            return s
        n_blocks = -(-self.steps_per_epoch // self._block_steps)
        s = torch.zeros(self._size, dtype=self._dtype, device=self._device)
        for b in range(n_blocks):
            s += self._raw(epoch, b, notify=False).sum(0)
        s *= self.gamma
        self._sum_cache[epoch] = s
        while len(self._sum_cache) > 2:
            self._sum_cache.popitem(last=False)
        return s

    # -- grid access -------------------------------------------------------------------
    def increment(self, k: int) -> torch.Tensor:
        """ΔW of grid step k (a new tensor)."""
        e, m = divmod(int(k), self.steps_per_epoch)
        b, r = divmod(m, self._block_steps)
        return self._raw(e, b)[r] - self._epoch_sum(e)

    def increments(self, k0: int, k1: int) -> torch.Tensor:
        """The increments of grid steps k0, …, k1 − 1, shape (k1 − k0, *size) (a new tensor)."""
        if not 0 <= k0 <= k1:
            raise ValueError(f"need 0 <= k0 <= k1, got k0={k0}, k1={k1}")
        parts = []
        k = k0
        S, B = self.steps_per_epoch, self._block_steps
        while k < k1:
            e, m = divmod(k, S)
            b, r = divmod(m, B)
            raw = self._raw(e, b)
            stop = min(raw.shape[0], r + (k1 - k))
            parts.append(raw[r:stop] - self._epoch_sum(e))
            k += stop - r
        if not parts:
            return torch.zeros((0, *self._size), dtype=self._dtype, device=self._device)
        return torch.cat(parts, 0)

    def epoch_of(self, t) -> int:
        """The epoch of the grid step that starts at time t."""
        return self.index(t) // self.steps_per_epoch
