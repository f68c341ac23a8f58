"""Monte Carlo front end: many Lipschitz trajectories with torchsde, summarised tidily.

:func:`simulate` runs ``torchsde.sdeint`` (Euler–Maruyama) for n trajectories of any of
the systems of :mod:`sdelip.sde` (:class:`ParameterSDE`, :class:`LipschitzSDE`,
:class:`ReducedLipschitzSDE`) on CPU or CUDA, in chunks of trajectories when memory
requires, with a :class:`GridBrownian` per chunk (seed, stream = chunk index), and
returns the mean, variance and quantiles of K(t) (Thm 17's quantities), optionally the
paths. :func:`simulate_record` does it for the reduced system of a tracking record and
attaches Thm 17's closed forms for comparison.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import attrs
import numpy as np
import pandas as pd
import torch
import torchsde

from ..core.formulas import LipschitzMoments
from .brownian import GridBrownian
from .reduced import ReducedLipschitzSDE

__all__ = ["SimulationResult", "simulate", "simulate_record"]

#: Default memory budget (bytes) for one chunk's saved states and working memory on CPU.
CPU_CHUNK_BYTES = 1 << 30
#: Largest set of saved K paths kept for quantiles / keep_paths.
MAX_PATH_BYTES = 4 << 30


@attrs.frozen
class SimulationResult:
    """Summary of a Monte Carlo simulation of K(t) (tidy: one entry per saved time).

    Attributes:
        t: saved times (T,).
        n: number of trajectories.
        mean_K, var_K: sample mean and (unbiased) variance of K(t), (T,).
        mean_Z, var_Z: sample mean and variance of Z(t) = log K(t), (T,).
        quantile_levels: the probabilities of :attr:`quantiles`.
        quantiles: (Q, T) sample quantiles of K(t) (empty if none were asked).
        paths: (T, n) K paths if ``keep_paths`` was set, else None.
        theory: Thm 17's moments at the saved times (reduced systems), else None.
        seconds: wall time of the simulation.
        device: where it ran.
        chunk_size: trajectories per sdeint call.
    """

    t: np.ndarray
    n: int
    mean_K: np.ndarray
    var_K: np.ndarray
    mean_Z: np.ndarray
    var_Z: np.ndarray
    quantile_levels: tuple
    quantiles: np.ndarray
    paths: Optional[np.ndarray] = None
    theory: Optional[LipschitzMoments] = None
    seconds: float = 0.0
    device: str = "cpu"
    chunk_size: int = 0

    @property
    def std_K(self) -> np.ndarray:
        return np.sqrt(self.var_K)

    def to_frame(self) -> pd.DataFrame:
        """A tidy DataFrame: one row per saved time; columns t, mean_K, var_K, std_K,
        mean_Z, var_Z, q<level> per quantile and, with theory, theory_mean_K, theory_var_K."""
        cols = {"t": self.t, "mean_K": self.mean_K, "var_K": self.var_K, "std_K": self.std_K,
                "mean_Z": self.mean_Z, "var_Z": self.var_Z}
        for q, row in zip(self.quantile_levels, self.quantiles):
            cols[f"q{q:g}"] = row
        if self.theory is not None:
            cols["theory_mean_K"] = self.theory.mean_K
            cols["theory_var_K"] = self.theory.var_K
        return pd.DataFrame(cols)


class _EulerView:
    """The SDE as Euler needs it: f, g_prod, f_and_g_prod, without the dense g.

    sdeint's contract check evaluates every diffusion method it finds once; leaving g
    out spares the (batch, state, brownian) tensor (the noise size comes from ``bm``).
    """

    def __init__(self, sde):
        self.noise_type = sde.noise_type
        self.sde_type = sde.sde_type
        self.f = sde.f
        self.g_prod = sde.g_prod
        self.f_and_g_prod = sde.f_and_g_prod


def _resolve_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(device)!r} was asked for but CUDA is not available "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use device='cpu'"
        )
    return device


def _sde_dtype(sde) -> torch.dtype:
    for p in list(sde.buffers()) + list(sde.parameters()):
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _bytes_per_trajectory(sde, n_saved: int, itemsize: int) -> int:
    state = int(sde.state_size)
    per = n_saved * state * itemsize + 8 * state * itemsize
    M = getattr(sde, "M", None)
    if M is not None:
        if getattr(sde, "engine", None) == "materialised":  # per-sample gradients and noise rows
            per += 4 * int(M) * int(sde.n_params) * itemsize
        else:  # drift, increments and gradients; the system chunks its own working memory
            per += 6 * int(sde.n_params) * itemsize
    return per


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([int(seed) % (1 << 32), 0xC0FFEE, int(chunk)]).generate_state(1)[0])


def _merge(stats, x: torch.Tensor):
    """Chan et al.'s pairwise update of (count, mean, M2) along dim 1 of x (T, c), float64."""
    x = x.to(torch.float64)
    c = x.shape[1]
    mean = x.mean(1)
    m2 = ((x - mean.unsqueeze(1)) ** 2).sum(1)
    if stats is None:
        return c, mean, m2
    n0, mean0, m20 = stats
    n = n0 + c
    delta = mean - mean0
    return n, mean0 + delta * (c / n), m20 + m2 + delta**2 * (n0 * c / n)


def simulate(
    sde,
    n: int,
    ts,
    dt: Optional[float] = None,
    device="cpu",
    chunk_size: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    quantiles: Sequence[float] = (0.025, 0.5, 0.975),
    keep_paths: bool = False,
    dtype: Optional[torch.dtype] = None,
    block_steps: Optional[int] = None,
) -> SimulationResult:
    """Simulate n Lipschitz trajectories with ``torchsde.sdeint`` and summarise K(t).

    Args:
        sde: a :class:`ReducedLipschitzSDE`, :class:`LipschitzSDE` or
            :class:`ParameterSDE` (anything with ``initial_state``, ``brownian_size``,
            ``lipschitz`` and torchsde's ``f_and_g_prod``).
        n: number of trajectories.
        ts: save times, increasing, on the grid ts[0] + k·dt (e.g.
            :func:`sdelip.sde.time_grid`); kept in float64. For a system on a solver clock
            (a learning-rate schedule: :meth:`ReducedLipschitzSDE.clock_to_time`) these are
            clock times and the result's ``t`` holds the record's times t_k.
        dt: Euler step (default: the system's η: ``sde.dt`` or ``sde.lr``).
        device: ``"cpu"`` or ``"cuda"`` (RuntimeError if CUDA is asked for but absent).
        chunk_size: trajectories per sdeint call (default: as many as fit about 1 GiB,
            or a quarter of the free GPU memory).
        seed: seed of the Brownian motion (chunk i uses stream i) and of the data
            sampling of the parameter systems. Results are reproducible for a given
            (seed, chunk_size, device).
        progress: show a tqdm progress bar over all Euler steps.
        quantiles: probabilities of the K(t) quantiles to report.
        keep_paths: also return the (T, n) K paths.
        dtype: state dtype (default: the system's).
        block_steps: Brownian block length (see :class:`GridBrownian`).

    Returns:
        :class:`SimulationResult`.
    """
    n = int(n)
    if n < 2:
        raise ValueError(f"simulate needs n >= 2 trajectories for a variance, got {n}")
    device = _resolve_device(device)
    if dt is None:
        dt = getattr(sde, "dt", None) or getattr(sde, "lr", None)
        if dt is None:
            raise TypeError("pass dt: the system has neither dt nor lr")
    dt = float(dt)
    ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu().reshape(-1)
    if ts.numel() < 2 or not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError("ts must hold at least two strictly increasing times")
    n_steps = int(round(float(ts[-1] - ts[0]) / dt))
    off = ((ts - ts[0]) / dt - torch.round((ts - ts[0]) / dt)).abs().max()
    if float(off) > 1e-6:
        raise ValueError(f"the save times ts must lie on the grid ts[0] + k·dt (dt={dt}); off by {float(off):.3g} steps")
    sde = sde.to(device)
    dtype = dtype or _sde_dtype(sde)
    itemsize = torch.empty((), dtype=dtype).element_size()
    T = ts.numel()
    if chunk_size is None:
        budget = CPU_CHUNK_BYTES
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free // 4
        chunk_size = max(1, min(n, budget // _bytes_per_trajectory(sde, T, itemsize)))
    chunk_size = int(chunk_size)
    need_paths = keep_paths or len(quantiles) > 0
    if need_paths and T * n * 4 > MAX_PATH_BYTES:
        raise MemoryError(
            f"keeping {n} K paths at {T} times needs {T * n * 4 / 2**30:.1f} GiB: save fewer times "
            f"(ts every few steps), or pass quantiles=() and keep_paths=False for moments only"
        )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps * math.ceil(n / chunk_size), unit="step", desc="sdeint", leave=False)
    stats_K = stats_Z = None
    paths = []
    start = time.perf_counter()
    view = _EulerView(sde)
    try:
        for ci, c0 in enumerate(range(0, n, chunk_size)):
            nc = min(chunk_size, n - c0)
            if hasattr(sde, "reseed"):
                sde.reseed(_chunk_seed(seed, ci))
            done = [0]

            def on_block(k, done=done):
                if bar is not None:
                    k = min(k, n_steps - done[0])
                    done[0] += k
                    bar.update(k)

            make_bm = getattr(sde, "brownian_motion", None)  # the system's own driver (epoch-pinned when reshuffled)
            if make_bm is not None:
                bm = make_bm(nc, t0=float(ts[0]), dt=dt, seed=seed, stream=ci, dtype=dtype, device=device,
                             block_steps=block_steps, on_block=on_block)
            else:
                bm = GridBrownian(
                    t0=float(ts[0]), dt=dt, size=(nc, int(sde.brownian_size)), seed=seed, stream=ci, dtype=dtype,
                    device=device, block_steps=block_steps, on_block=on_block,
                )
            y0 = sde.initial_state(nc, dtype=dtype, device=device)
            with torch.no_grad():
                ys = torchsde.sdeint(view, y0, ts, bm=bm, dt=dt, method="euler")
                if hasattr(sde, "log_lipschitz"):
                    Z = sde.log_lipschitz(ys)
                else:
                    Z = sde.lipschitz(ys).log()
                K = Z.exp()
            del ys
            stats_K = _merge(stats_K, K)
            stats_Z = _merge(stats_Z, Z)
            if need_paths:
                paths.append(K.to("cpu", torch.float32))
            if bar is not None and done[0] < n_steps:
                bar.update(n_steps - done[0])
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    count, mean_K, m2_K = stats_K
    _, mean_Z, m2_Z = stats_Z
    levels = tuple(float(q) for q in quantiles)
    qs = np.zeros((0, T))
    P = None
    if need_paths:
        P = torch.cat(paths, 1)
        if levels:
            qs = torch.quantile(P.to(torch.float64), torch.tensor(levels, dtype=torch.float64), dim=1).numpy()
    # A system on a solver clock (a learning-rate schedule, ReducedLipschitzSDE.step_sizes) reports its own times.
    to_time = getattr(sde, "clock_to_time", None)
    t_out = np.asarray(to_time(ts.numpy()) if to_time is not None else ts.numpy(), dtype=np.float64)
    theory = None
    if isinstance(sde, ReducedLipschitzSDE):
        k = torch.round((ts - sde.t0) / sde.dt).long()
        if int(k[0]) == 0 and int(k.max()) <= sde.n_steps:
            m = sde.moments(int(k.max()))
            idx = k.numpy()
            theory = LipschitzMoments(
                t=t_out, mean_Z=m.mean_Z[idx], var_Z=m.var_Z[idx], mean_K=m.mean_K[idx], var_K=m.var_K[idx]
            )
    return SimulationResult(
        t=t_out,
        n=count,
        mean_K=mean_K.cpu().numpy(),
        var_K=(m2_K / (count - 1)).cpu().numpy(),
        mean_Z=mean_Z.cpu().numpy(),
        var_Z=(m2_Z / (count - 1)).cpu().numpy(),
        quantile_levels=levels,
        quantiles=qs,
        paths=P.numpy() if keep_paths else None,
        theory=theory,
        seconds=seconds,
        device=str(device),
        chunk_size=chunk_size,
    )


def simulate_record(
    record,
    n: int = 10_000,
    every: Optional[int] = None,
    n_steps: Optional[int] = None,
    lr: Optional[float] = None,
    layers: Optional[Sequence[str]] = None,
    per_layer: bool = True,
    include_drift: bool = True,
    include_noise_curvature: bool = True,
    include_ito_correction: bool = True,
    include_diffusion: bool = True,
    sampling: str = "iid",
    n_train: Optional[int] = None,
    batch_size: Optional[int] = None,
    **kwargs,
) -> SimulationResult:
    """Simulate the reduced Z-system of a tracking record; Thm 17 attached as ``theory``.

    ``sampling="reshuffle"`` simulates the system with epoch-pinned noise (reshuffled
    epochs of ⌊N/M⌋ steps, :class:`ReducedLipschitzSDE` with ``steps_per_epoch`` and
    ``batch_fraction`` = M/N; ``theory`` then holds its closed-form moments);
    ``sampling="auto"`` takes the record's own sampling (its metadata's
    ``config.sampling``, as :func:`sdelip.workbench.train.train` writes it; iid when absent).

    Args:
        record: a tracking record: the DataFrame of ``sdelip.record.load_record`` or the
            path of a record file.
        n: number of trajectories.
        every: save every this many steps (default: about 1,000 saved times).
        n_steps: simulate the first n_steps steps (default: the whole record).
        lr, layers, per_layer: see :meth:`ReducedLipschitzSDE.from_record`. A record whose
            learning rate varies (a schedule) is simulated on its own η(t), each step over its
            own Δt, and the result's ``t`` is the record's time; ``lr=`` for such a record raises
            :class:`~sdelip.errors.LearningRateScheduleError` (one η would change the clock silently).
        include_drift, include_noise_curvature, include_ito_correction, include_diffusion:
            term switches (ablations).
        sampling: ``"iid"`` (default, Thm 17), ``"reshuffle"`` or ``"auto"`` (see above).
        n_train: N, the training-set size (needed for ``"reshuffle"`` unless the record's
            metadata has ``n_train``).
        batch_size: M (default: the record's ``batch_size`` column or metadata).
        **kwargs: passed to :func:`simulate` (device, chunk_size, seed, progress, …).
    """
    meta = {}
    if not hasattr(record, "columns"):
        from ..record import load_metadata, load_record

        try:
            meta = load_metadata(record) or {}
        except Exception:  # a record without metadata: only explicit options then
            meta = {}
        record = load_record(record)
    else:
        meta = dict(getattr(record, "attrs", {}) or {}).get("metadata") or dict(getattr(record, "attrs", {}) or {})
    epochs = _reshuffle_options(record, meta, sampling, n_train, batch_size)
    sde = ReducedLipschitzSDE.from_record(
        record, lr=lr, layers=layers, per_layer=per_layer, include_drift=include_drift,
        include_noise_curvature=include_noise_curvature, include_ito_correction=include_ito_correction,
        include_diffusion=include_diffusion, **epochs,
    )
    steps = sde.n_steps if n_steps is None else int(n_steps)
    if every is None:
        every = max(1, steps // 1000)
    ts = sde.time_grid(every=every, n_steps=steps)
    return simulate(sde, n, ts, dt=sde.dt, **kwargs)


def _reshuffle_options(record, meta: dict, sampling: str, n_train, batch_size) -> dict:
    """``steps_per_epoch`` and ``batch_fraction`` for :meth:`ReducedLipschitzSDE.from_record` ({} for iid)."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if sampling == "auto":
        sampling = str(config.get("sampling", "iid"))
    if sampling not in ("iid", "reshuffle"):
        raise ValueError(f"sampling must be 'iid', 'reshuffle' or 'auto', got {sampling!r}")
    if sampling == "iid":
        return {}
    if batch_size is None:
        batch_size = config.get("batch_size", meta.get("batch_size"))
        if batch_size is None and "batch_size" in getattr(record, "columns", ()):
            batch_size = int(np.asarray(record["batch_size"])[0])
    if n_train is None:
        n_train = meta.get("n_train", config.get("n_train"))
    if batch_size is None or n_train is None:
        raise ValueError(
            f"sampling='reshuffle' needs the training-set size N and the batch size M to place the epochs: pass "
            f"n_train= and batch_size= (found N = {n_train!r}, M = {batch_size!r} in the record)"
        )
    N, M = int(n_train), int(batch_size)
    if not 1 <= M <= N:
        raise ValueError(f"need 1 <= batch_size <= n_train, got M = {M}, N = {N}")
    return {"steps_per_epoch": N // M, "batch_fraction": M / N}
