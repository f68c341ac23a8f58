"""A grid-aligned Brownian motion with torchsde's interface, for long fixed-step runs.

torchsde's default :class:`torchsde.BrownianInterval` builds a binary tree of
intervals as it is queried; on a grid of tens of thousands of steps (the paper's runs
have 39,000 SGD steps, Sec 7) its recursive splitting overflows Python's recursion
limit unless it is told the step size. The Euler scheme only ever asks for the
increments W(t_{k+1}) − W(t_k) of consecutive grid points, so :class:`GridBrownian`
draws exactly those: independent N(0, dt) increments per grid step, generated in
blocks of steps from a counter-based seed (seed, stream, block index). Any (ta, tb)
on the grid is therefore reproducible, in any order, without storing the path, and
different ``stream`` values (e.g. trajectory chunks) are independent.

The SDE time convention of docs/theory.md §1 applies: after k SGD steps t = k·η, and the
natural grid step is dt = η.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torchsde import BaseBrownian

__all__ = ["GridBrownian", "time_grid"]

#: Target size in bytes of one block of pre-drawn increments.
_BLOCK_BYTES = 1 << 20


def time_grid(t1: float, dt: float, every: int = 1, t0: float = 0.0, dtype=torch.float64) -> torch.Tensor:
    """Save times t0, t0 + every·dt, …, up to t1 (t1 always included), in float64.

    sdeint accumulates its time in the dtype of ``ts``; float64 keeps 39,000 steps of
    dt = 1e-3 on the grid, float32 does not (see :class:`GridBrownian`).

    Args:
        t1: final time (a multiple of dt up to rounding).
        dt: step length.
        every: number of steps between saved times.
        t0: initial time.
        dtype: dtype of the returned tensor (keep float64).
    """
    if dt <= 0 or every < 1:
        raise ValueError(f"need dt > 0 and every >= 1, got dt={dt!r}, every={every!r}")
    n_steps = int(round((t1 - t0) / dt))
    if n_steps < 1:
        raise ValueError(f"t1 = {t1!r} must be at least one step dt = {dt!r} after t0 = {t0!r}")
    ks = list(range(0, n_steps + 1, every))
    if ks[-1] != n_steps:
        ks.append(n_steps)
    return t0 + torch.tensor(ks, dtype=dtype) * dt


def _block_seed(seed: int, stream: int, block: int) -> int:
    # Counter-based: a SeedSequence over (seed, stream, block) gives well-mixed,
    # independent 63-bit seeds for every block of every stream.
    s = int(seed) % (1 << 64)
    state = np.random.SeedSequence([s & 0xFFFFFFFF, s >> 32, int(stream) % (1 << 32), int(block)])
    words = state.generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class GridBrownian(BaseBrownian):
    """Brownian motion on the grid t_k = t0 + k·dt, reproducible from (seed, stream).

    Implements what :func:`torchsde.sdeint` needs of ``bm``: ``bm(ta, tb)`` returns
    W(tb) − W(ta) with shape ``size``; ``shape``, ``dtype``, ``device`` and
    ``levy_area_approximation`` (``"none"``: use ``method="euler"``).

    Queries must lie on the grid (within ``tol`` steps). A solver step of several grid
    steps (sdeint's dt an integer multiple of the grid dt) returns the sum of their
    increments, so the same path can be integrated at several step sizes. An interval
    whose two ends fall on the same grid point has a zero increment: sdeint's time
    accumulation can produce such a sliver at the very end of a run.

    The increments of steps [b·B, (b+1)·B) form block b, drawn from a generator
    seeded by (seed, stream, b); the last two blocks are cached, so sequential access
    draws every block once. Returned tensors may be views of the cache: do not modify
    them in place.

    Args:
        t0: the start of the grid.
        dt: the grid step (the learning rate η for SGD time).
        size: shape of one increment, (batch, noise_channels) for sdeint.
        seed: global seed.
        stream: stream index; different streams are independent (e.g. one per chunk
            of trajectories).
        n_steps: optional number of grid steps; queries beyond it raise.
        dtype: increment dtype (default: torch's default dtype).
        device: increment device; CUDA increments are drawn on the GPU.
        block_steps: steps per block (default: about 1 MiB per block). The path
            depends on it; keep it fixed to reproduce a path.
        tol: how far, in steps, a query may sit from the grid.
        on_block: optional callback ``on_block(n_new_steps)`` called whenever a new
            block is drawn (used for progress bars).
    """

    def __init__(
        self,
        t0: float,
        dt: float,
        size: Union[int, Sequence[int]],
        seed: int = 0,
        stream: int = 0,
        n_steps: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
        block_steps: Optional[int] = None,
        tol: float = 1e-3,
        on_block: Optional[Callable[[int], None]] = None,
    ):
        dt = float(dt)
        if not dt > 0 or not np.isfinite(dt):
            raise ValueError(f"dt must be a positive finite number, got {dt!r}")
        self._t0 = float(t0)
        self._dt = dt
        self._size = torch.Size((size,) if isinstance(size, int) else tuple(int(s) for s in size))
        self._dtype = dtype if dtype is not None else torch.get_default_dtype()
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._seed = int(seed)
        self._stream = int(stream)
        self._n_steps = None if n_steps is None else int(n_steps)
        numel = max(1, self._size.numel())
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        if block_steps is None:
            block_steps = max(1, min(4096, _BLOCK_BYTES // (numel * itemsize)))
        if int(block_steps) < 1:
            raise ValueError(f"block_steps must be >= 1, got {block_steps!r}")
        self._block_steps = int(block_steps)
        self._tol = float(tol)
        self._sqrt_dt = dt**0.5
        self._cache: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self.on_block = on_block

    # -- torchsde's interface ------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self._size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def levy_area_approximation(self) -> str:
        return "none"

    def __repr__(self) -> str:
        return (
            f"GridBrownian(t0={self._t0}, dt={self._dt}, size={tuple(self._size)}, seed={self._seed}, "
            f"stream={self._stream}, block_steps={self._block_steps}, dtype={self._dtype}, device={self._device})"
        )

    def __call__(self, ta, tb=None, return_U: bool = False, return_A: bool = False) -> torch.Tensor:
        """W(tb) − W(ta) for grid times ta ≤ tb (W(ta) − W(t0) if tb is None)."""
        if return_U or return_A:
            raise ValueError(
                "GridBrownian has no Lévy area (levy_area_approximation='none'): "
                "integrate with sdeint(..., method='euler')"
            )
        if tb is None:
            ta, tb = self._t0, ta
        ka, kb = self.index(ta), self.index(tb)
        if kb < ka:
            raise ValueError(f"query times must satisfy ta <= tb, got ta={float(ta)!r}, tb={float(tb)!r}")
        if kb == ka:
            return torch.zeros(self._size, dtype=self._dtype, device=self._device)
        if kb == ka + 1:
            return self.increment(ka)
        return self.increments(ka, kb).sum(0)

    # -- grid access -------------------------------------------------------------------
    @property
    def t0(self) -> float:
        return self._t0

    @property
    def dt(self) -> float:
        return self._dt

    @property
    def block_steps(self) -> int:
        return self._block_steps

    def index(self, t) -> int:
        """The grid index k with t = t0 + k·dt; raises if t is off the grid."""
        x = (float(t) - self._t0) / self._dt
        k = int(round(x))
        if abs(x - k) > self._tol:
            raise ValueError(
                f"time {float(t)!r} is not on the Brownian grid t0 + k·dt (t0={self._t0}, dt={self._dt}; "
                f"off by {abs(x - k):.3g} steps). Use a solver dt that is a multiple of the grid dt and "
                f"float64 save times ts (e.g. sdelip.sde.time_grid): sdeint accumulates time in the dtype of ts"
            )
        if k < 0 or (self._n_steps is not None and k > self._n_steps):
            raise ValueError(f"time {float(t)!r} (grid index {k}) is outside the grid [0, {self._n_steps}]")
        return k

    def increment(self, k: int) -> torch.Tensor:
        """The increment W(t_{k+1}) − W(t_k) of grid step k (a view of the cache: read only)."""
        b, r = divmod(int(k), self._block_steps)
        return self._block(b)[r]

    def increments(self, k0: int, k1: int) -> torch.Tensor:
        """The increments of grid steps k0, …, k1 − 1, shape (k1 − k0, *size) (a new tensor)."""
        if not 0 <= k0 <= k1:
            raise ValueError(f"need 0 <= k0 <= k1, got k0={k0}, k1={k1}")
        parts = []
        k = k0
        while k < k1:
            b, r = divmod(k, self._block_steps)
            stop = min(k1 - b * self._block_steps, self._block_steps)
            parts.append(self._block(b)[r:stop])
            k = b * self._block_steps + stop
        if not parts:
            return torch.zeros((0, *self._size), dtype=self._dtype, device=self._device)
        return torch.cat(parts, 0)

    def _block(self, b: int) -> torch.Tensor:
        blk = self._cache.get(b)
        if blk is not None:
            return blk
        gen = torch.Generator(device=self._device)
        gen.manual_seed(_block_seed(self._seed, self._stream, b))
        blk = torch.empty((self._block_steps, *self._size), dtype=self._dtype, device=self._device)
        blk.normal_(0.0, self._sqrt_dt, generator=gen)
        self._cache[b] = blk
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        if self.on_block is not None:
            self.on_block(self._block_steps)
        return blk
