"""The reduced Z-system: per-layer log-Lipschitz SDEs with coefficients from a record.

Along a tracked SGD run the coefficients of Thm 14 are known at every step k:
μ^(ℓ)_k, κ^(ℓ)_k and ‖λ^(ℓ)‖²_k. Taking them as deterministic, piecewise-constant
functions of time (value k on [t_k, t_{k+1}), t_k = t0 + k·η, docs/theory.md §1), each layer's
Z^(ℓ) = log K^(ℓ) follows (Thm 14 and Itô's lemma for log, as in Thm 15)

    dZ^(ℓ) = (μ^(ℓ) + κ^(ℓ) − ½‖λ^(ℓ)‖²) dt + ‖λ^(ℓ)‖ dW^(ℓ),

with independent scalar W^(ℓ) per layer (Assumption 3: λ^(ℓ)ᵀ dB^(ℓ) has the law of
‖λ^(ℓ)‖ dW^(ℓ)), Z = Σ_ℓ Z^(ℓ) and K = e^Z (Thm 15, 16). This is a diagonal-noise SDE
with L state coordinates, cheap enough for 10⁴ trajectories over 39,000 steps. With
piecewise-constant coefficients on the step grid, Euler is exact in law, and the
moments are Thm 17's closed forms (:meth:`ReducedLipschitzSDE.moments`).

**Learning-rate schedules** (``step_sizes``). With a varying η (StepLR, cosine, warm-up) step k
lasts its own Δt_k = η_k: the record's t column is the time grid, t_{k+1} = t_k + Δt_k. The
system is integrated on a uniform solver clock u_k = t0 + k·dt (dt = Δt_0) with the
coefficients of step k multiplied by Δt_k/dt (drift) and √(Δt_k/dt) (noise): Z at clock u_k then
has exactly the law of Z at time t_k (piecewise-constant coefficients, a deterministic time
change), and :func:`~sdelip.sde.simulate` reports the times t_k (:meth:`ReducedLipschitzSDE.clock_to_time`).

**Reshuffled epochs** (``steps_per_epoch=S``, ``batch_fraction=α = M/N``; docs/theory.md §10).
With SGD's noise pinned within each epoch, each W^(ℓ) becomes an
:class:`~sdelip.sde.EpochBrownian` (Cov of one epoch's increments dt(δ_jk − α)), and the
Itô terms κ − ½‖λ‖², which come from the noise's accumulated variance, follow the
variance of the pinned noise instead of growing like t: at step m of an epoch the drift
is μ + (κ − ½‖λ‖²)(1 − α(2m + 1)), the increment of V_m = dt·m(1 − α m), the variance
of the epoch's first m noise increments. Z is Gaussian, and

    E[Z_k] = Z0 + Σ_{j<k} a_j dt,
    Var[Z_k] = Σ_{j<k} ‖λ_j‖² dt − α dt Σ_epochs (Σ_{j<k in the epoch} ‖λ_j‖)²,
    E[K] = exp(E[Z] + ½ Var[Z]),   Var[K] = E[K]² (e^{Var Z} − 1):

within an epoch Var[Z] follows the bridge, m dt ‖λ‖²(1 − α m) for constant ‖λ‖; at the end
of an epoch that uses every sample (α S = 1) it is S dt times the variance of ‖λ‖ over the
epoch's steps — zero for constant coefficients, and E[K] = K0 exp ∫μ: the noise and its
Itô terms cancel over the epoch. What remains in real reshuffled SGD beyond that (θ
moving within the epoch, so that the noise enters the drift) is not in this system.

That weighting is for a drift μ of the *expected* gradient (``drift_source="expected"``).
A tracking record's μ is measured on each step's own mini-batch; along reshuffled SGD the
step's batch is anti-correlated with the epoch's earlier ones (the remaining samples pull
θ back: the pinned noise's own drift −W/(T_e − t)), so the records' mean μ already carries
−2αm(κ − ½‖λ‖²) and Thm 17's drift μ + κ − ½‖λ‖² is then the right one
(``drift_source="minibatch"``, the default of :meth:`from_record`): only the noise is pinned.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .._checks import check_positive
from ..errors import LearningRateScheduleError
from ..core.formulas import LipschitzMoments, lipschitz_moments, repeated_use_coefficients
from ..analysis.prediction import check_modelled
from ..core.catalogue import LOG_K_COEFFICIENTS, layer_column, network_column

__all__ = ["ReducedLipschitzSDE", "record_lr", "record_step_sizes"]

_TERMS = LOG_K_COEFFICIENTS  # μ, κ, ‖λ‖²: the tables of the reduced system, in its constructor's order


def record_lr(record) -> float:
    """The learning rate η of a tracking record.

    Taken from the ``lr`` column when the record has one (it must be constant), else
    from ``record.attrs["lr"]``, ``record.attrs["metadata"]["lr"]`` or
    ``record.attrs["meta"]["lr"]``, else inferred from the columns t = step·η.

    Raises:
        NotImplementedError: the ``lr`` column varies (the reduced system has one step dt).
    """
    if "lr" in record.columns and len(record) > 0:
        lrs = np.asarray(record["lr"], dtype=np.float64)
        lrs = lrs[np.isfinite(lrs)]
        if len(lrs):
            if np.any(np.abs(lrs - lrs[0]) > 1e-9 * abs(lrs[0])):
                raise NotImplementedError(
                    f"the record's learning rate varies ({lrs.min():g} to {lrs.max():g}); the reduced system "
                    "integrates on one step dt = η"
                )
            return check_positive(lrs[0], "record lr")
    attrs = getattr(record, "attrs", {}) or {}
    for holder in (attrs, attrs.get("metadata") or {}, attrs.get("meta") or {}):
        if isinstance(holder, dict) and holder.get("lr") is not None:
            return check_positive(holder["lr"], "record lr")
    if "t" in record.columns and "step" in record.columns:
        steps = np.asarray(record["step"], dtype=np.float64)
        ts = np.asarray(record["t"], dtype=np.float64)
        ok = steps > 0
        if ok.any():
            lr = float(np.median(ts[ok] / steps[ok]))
            return check_positive(lr, "record lr (inferred from t / step)")
    raise ValueError(
        "the record's learning rate is unknown: no attrs['lr'] / attrs['metadata']['lr'] and no t and step "
        "columns to infer it from; pass lr="
    )


def record_step_sizes(record) -> Optional[np.ndarray]:
    """Δt of every step from the record's first to its last tracked step, or None when η is constant.

    Step k lasts Δt_k = t_{k+1} − t_k (the ``t`` column; between sparse rows the interval is
    split evenly over its steps); the last row's step lasts its own ``lr``. None when the
    record has one learning rate: a constant ``lr`` column and evenly spaced times (or
    neither column). The reduced system with these step sizes integrates on the record's
    own η(t) (:meth:`ReducedLipschitzSDE.from_record`).
    """
    if "step" not in record.columns or len(record) == 0:
        return None
    df = record.sort_values("step")
    steps = np.asarray(df["step"], dtype=np.int64)
    lrs = np.asarray(df["lr"], dtype=np.float64) if "lr" in df.columns else None
    if lrs is not None and not np.all(np.isfinite(lrs)):
        lrs = None
    varies = lrs is not None and bool(np.any(np.abs(lrs - lrs[0]) > 1e-9 * abs(lrs[0])))
    per_step = None
    if "t" in df.columns and len(steps) > 1:
        ts = np.asarray(df["t"], dtype=np.float64)
        per_step = np.diff(ts) / np.diff(steps)
        if not np.all(per_step > 0):
            raise ValueError("the record's time t must increase with its steps")
        varies = varies or bool(np.any(np.abs(per_step - per_step[0]) > 1e-6 * per_step[0]))
    if not varies:
        return None
    span = steps - steps[0]
    T = int(span[-1]) + 1
    owner = np.searchsorted(span, np.arange(T), side="right") - 1
    if per_step is None:  # no times: each row's own η over its steps
        return lrs[owner]
    last = lrs[-1] if lrs is not None else per_step[-1]
    return np.append(per_step, last)[owner]


def schedule_refusal(record, step_sizes, given: str) -> LearningRateScheduleError:
    """The error for one η given (``given``: ``"lr="``, ``"--lr"``) with a record whose η varies."""
    lrs = np.asarray(record["lr"], dtype=np.float64) if "lr" in record.columns else step_sizes
    return LearningRateScheduleError(
        f"the record's learning rate varies ({np.nanmin(lrs):g} to {np.nanmax(lrs):g}, a schedule): the simulation "
        f"integrates on the record's own η(t) (its t column, each step over its own Δt); a single {given} would "
        f"integrate with one η and is refused: leave {given} out"
    )


def _as_table(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] < 1:
        raise ValueError(f"{name} must have shape (T,) or (T, L) with T >= 1, got {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = np.flatnonzero(~np.isfinite(a).all(1))[:5].tolist()
        raise ValueError(f"{name} has non-finite values at steps {bad}")
    return a


class ReducedLipschitzSDE(nn.Module):
    """Per-layer Z^(ℓ) = log K^(ℓ) with piecewise-constant Thm 14 coefficients.

    State (batch, L): one Z^(ℓ) per layer (L = 1 for the network-level Z of Thm 15).
    ``noise_type="diagonal"``, ``sde_type="ito"``; integrate with ``method="euler"``.

    Drift a_k = μ_k + κ_k − ½‖λ‖²_k and diffusion b_k = ‖λ‖_k at the step k containing t
    (a solver dt finer than the record's step also works). The ``include_*`` switches
    remove a term, for ablations (the ensemble validation measures each term's worth by
    removing it); :meth:`moments` follows the switches.

    Args:
        drift: μ per step, (T,) or (T, L).
        noise_curvature: κ per step, same shape.
        diffusion_sq: ‖λ‖² per step, same shape, ≥ 0.
        dt: the step length η of the coefficient grid.
        Z0: initial log K^(ℓ), (L,) (or give K0).
        K0: initial K^(ℓ) > 0, (L,).
        t0: time of step 0.
        layer_names: names of the L layers.
        include_drift: keep μ.
        include_noise_curvature: keep κ.
        include_ito_correction: keep −½‖λ‖².
        include_diffusion: keep the noise ‖λ‖ dW.
        dtype: dtype of the coefficient tables (the state's dtype).
        step_sizes: Δt of every step, (T,), for a varying learning rate (module docstring):
            the solver clock keeps the uniform step ``dt`` and step k's coefficients are scaled
            by Δt_k/dt; :meth:`clock_to_time` maps the clock to the times t_k. None: every step
            lasts dt.
    """

    def __init__(
        self,
        drift,
        noise_curvature,
        diffusion_sq,
        dt: float,
        Z0=None,
        K0=None,
        t0: float = 0.0,
        layer_names: Optional[Sequence[str]] = None,
        include_drift: bool = True,
        include_noise_curvature: bool = True,
        include_ito_correction: bool = True,
        include_diffusion: bool = True,
        dtype: torch.dtype = torch.float32,
        steps_per_epoch: Optional[int] = None,
        batch_fraction: Optional[float] = None,
        epoch_phase: int = 0,
        drift_source: str = "expected",
        step_sizes=None,
    ):
        super().__init__()
        self.noise_type = "diagonal"
        self.sde_type = "ito"
        mu = _as_table(drift, "drift")
        kappa = _as_table(noise_curvature, "noise_curvature")
        lam2 = _as_table(diffusion_sq, "diffusion_sq")
        if not (mu.shape == kappa.shape == lam2.shape):
            raise ValueError(f"coefficient shapes differ: {mu.shape}, {kappa.shape}, {lam2.shape}")
        if np.any(lam2 < 0):
            raise ValueError("diffusion_sq must be non-negative")
        T, L = mu.shape
        self.dt = check_positive(dt, "dt")
        self.t0 = float(t0)
        if (Z0 is None) == (K0 is None):
            raise TypeError("give exactly one of Z0 (initial log K per layer) or K0 (initial K per layer)")
        if Z0 is None:
            K0 = np.atleast_1d(np.asarray(K0, dtype=np.float64))
            if np.any(~(K0 > 0)) or not np.all(np.isfinite(K0)):
                raise ValueError(f"K0 must be positive and finite, got {K0}")
            Z0 = np.log(K0)
        Z0 = np.atleast_1d(np.asarray(Z0, dtype=np.float64))
        if Z0.shape != (L,):
            raise ValueError(f"the initial state has shape {Z0.shape}, the coefficients have {L} layer(s)")
        self.layer_names = list(layer_names) if layer_names is not None else [f"layer{i}" for i in range(L)]
        if len(self.layer_names) != L:
            raise ValueError(f"{len(self.layer_names)} layer names for {L} layers")
        self.include_drift = bool(include_drift)
        self.include_noise_curvature = bool(include_noise_curvature)
        self.include_ito_correction = bool(include_ito_correction)
        self.include_diffusion = bool(include_diffusion)
        self.mu, self.kappa, self.lam2, self.Z0 = mu, kappa, lam2, Z0
        if steps_per_epoch is None:
            if batch_fraction is not None:
                raise TypeError("batch_fraction needs steps_per_epoch (reshuffled epochs)")
            self.steps_per_epoch, self.batch_fraction = None, None
        else:
            S = int(steps_per_epoch)
            alpha = 1.0 / S if batch_fraction is None else float(batch_fraction)
            if S < 1 or not (alpha > 0 and alpha * S <= 1 + 1e-12):
                raise ValueError(f"reshuffled epochs need steps_per_epoch S >= 1 and 0 < batch_fraction·S <= 1, "
                                 f"got S = {steps_per_epoch!r}, batch_fraction = {batch_fraction!r}")
            self.steps_per_epoch, self.batch_fraction = S, alpha
        self.epoch_phase = int(epoch_phase)
        if drift_source not in ("expected", "minibatch"):
            raise ValueError(f"drift_source must be 'expected' or 'minibatch', got {drift_source!r}")
        self.drift_source = drift_source
        if step_sizes is None:
            self.step_sizes = None
        else:
            h = np.asarray(step_sizes, dtype=np.float64).reshape(-1)
            if h.shape != (T,) or not np.all(np.isfinite(h)) or np.any(h <= 0):
                raise ValueError(f"step_sizes must hold {T} positive finite step lengths, got shape {h.shape}")
            self.step_sizes = h
        a, b2 = self.log_coefficients()
        self.register_buffer("log_drift", torch.as_tensor(a, dtype=dtype))
        self.register_buffer("diffusion", torch.as_tensor(np.sqrt(b2), dtype=dtype))
        self.register_buffer("z0", torch.as_tensor(Z0, dtype=dtype))
        self._rows = None

    # -- construction from a record ------------------------------------------------------
    @classmethod
    def from_record(
        cls,
        record,
        lr: Optional[float] = None,
        layers: Optional[Sequence[str]] = None,
        per_layer: bool = True,
        **kwargs,
    ) -> "ReducedLipschitzSDE":
        """The reduced system of a tracking record (``sdelip.record.load_record``).

        The record has one row per tracked step with columns ``step``, per layer
        ``K/<layer>``, ``drift/<layer>``, ``noise_curvature/<layer>``,
        ``diffusion_sq/<layer>`` and network columns ``K``, ``drift_Z``,
        ``noise_curvature_Z``, ``diffusion_sq_Z``. The coefficients of a row hold from
        its step until the next recorded step (every step when the record is dense),
        and the initial state is log K at the first row.

        A record of a model with tied weights has ``uses/<layer>`` columns: a layer whose
        weight is applied c > 1 times is simulated as its factor σ1^c of K, with the
        coefficients of :func:`sdelip.core.formulas.repeated_use_coefficients`.

        Args:
            record: the record DataFrame.
            lr: the learning rate η (default: from the record, see :func:`record_lr`). A record
                whose η varies (:func:`record_step_sizes`) is integrated on its own η(t), step k
                over its own Δt_k; an ``lr`` for it raises :class:`~sdelip.errors.LearningRateScheduleError`.
            layers: layer names to simulate (default: every layer with a ``drift/`` column).
            per_layer: one Z^(ℓ) per layer (True) or the network Z alone (False).
            **kwargs: ``include_*`` switches, ``dtype`` and the reshuffled-epoch options
                ``steps_per_epoch``, ``batch_fraction`` (``epoch_phase`` defaults to the first
                step's position in its epoch, ``drift_source`` to ``"minibatch"``: a record's μ is
                measured on each step's batch) of :class:`ReducedLipschitzSDE`.
        """
        check_modelled(record, "the reduced SDE")
        if "step" not in record.columns:
            raise ValueError("the record has no 'step' column")
        step_sizes = record_step_sizes(record)
        if step_sizes is not None:
            if lr is not None:
                raise schedule_refusal(record, step_sizes, "lr=")
            lr = float(step_sizes[0])  # the solver clock; each step keeps its own Δt
        lr = record_lr(record) if lr is None else check_positive(lr, "lr")
        df = record.sort_values("step")
        steps = np.asarray(df["step"], dtype=np.int64)
        if len(steps) == 0:
            raise ValueError("the record is empty")
        if np.any(np.diff(steps) <= 0):
            raise ValueError("the record's steps must be unique")
        drift_prefix = layer_column("drift", "")
        all_layers = [c[len(drift_prefix):] for c in df.columns if c.startswith(drift_prefix)]
        if layers is None:
            layers = all_layers
        layers = list(layers)
        per_layer_cols = {k: [layer_column(k, name) for name in layers] for k in (*_TERMS, "sigma1")}
        if per_layer:
            if not layers:
                raise ValueError(f"the record has no per-layer columns {drift_prefix}<layer>")
            cols = per_layer_cols
        else:
            network = {k: [network_column(k)] for k in (*_TERMS, "sigma1")}
            whole = all(c[0] in df.columns for c in network.values()) and layers == all_layers
            cols = network if whole else per_layer_cols
        network_cols = cols["drift"][0] == network_column("drift")
        missing = [c for cs in cols.values() for c in cs if c not in df.columns]
        if missing:
            raise ValueError(f"the record lacks columns {missing}")
        # Dense per-step tables: row j holds from its step until the next recorded step.
        span = steps - steps[0]
        T = int(span[-1]) + 1
        owner = np.searchsorted(span, np.arange(T), side="right") - 1
        tables = {}
        for k in _TERMS:
            vals = np.asarray(df[cols[k]], dtype=np.float64)
            if not np.all(np.isfinite(vals)):
                bad = steps[~np.isfinite(vals).all(1)][:5].tolist()
                raise ValueError(f"the record has non-finite {k} values at steps {bad}")
            tables[k] = vals[owner]
        K0 = np.asarray(df[cols["sigma1"]].iloc[0], dtype=np.float64)
        if not network_cols:  # per-layer columns: a tied weight is the factor σ1^c of K
            K0 = K0.copy()
            for j, name in enumerate(layers):
                c = int(df[f"uses/{name}"].iloc[0]) if f"uses/{name}" in df.columns else 1
                if c != 1:
                    new = repeated_use_coefficients(c, *(tables[k][:, j] for k in _TERMS))
                    for k, column in zip(_TERMS, new):
                        tables[k][:, j] = column
                    K0[j] = K0[j] ** c
        if not per_layer and len(cols["sigma1"]) > 1:
            tables = {k: v.sum(1, keepdims=True) for k, v in tables.items()}
            K0 = np.array([np.prod(K0)])
            names = ["Z"]
        else:
            names = layers if per_layer else ["Z"]
        if kwargs.get("steps_per_epoch") is not None:
            if "epoch_phase" not in kwargs:  # step s is at s mod S of its epoch
                kwargs["epoch_phase"] = int(steps[0]) % int(kwargs["steps_per_epoch"])
            kwargs.setdefault("drift_source", "minibatch")  # a record's μ is the step's own mini-batch's
        return cls(
            tables["drift"], tables["noise_curvature"], tables["diffusion_sq"], dt=lr, K0=K0,
            t0=float(df["t"].iloc[0]) if "t" in df.columns else float(steps[0]) * lr, layer_names=names,
            step_sizes=step_sizes, **kwargs,
        )

    # -- coefficients --------------------------------------------------------------------
    def log_coefficients(self):
        """(a, b²): drift and squared diffusion of each Z^(ℓ) per step, (T, L) each, switches applied.

        With reshuffled epochs and ``drift_source="expected"`` the Itô terms κ − ½‖λ‖² are
        weighted by 1 − α(2m + 1) at step m of an epoch (the increment of the pinned noise's
        variance, module docstring); a mini-batch μ already carries that (weight 1).
        """
        ito = np.zeros_like(self.mu)
        if self.include_noise_curvature:
            ito = ito + self.kappa
        if self.include_ito_correction:
            ito = ito - 0.5 * self.lam2
        a = (self.mu if self.include_drift else np.zeros_like(self.mu)) + ito * self.epoch_weights()[:, None]
        b2 = self.lam2 if self.include_diffusion else np.zeros_like(self.lam2)
        if self.step_sizes is not None:  # step k over its own Δt_k on the uniform clock dt
            r = (self.step_sizes / self.dt)[:, None]
            a, b2 = a * r, b2 * r
        return a, b2

    @property
    def scheduled(self) -> bool:
        """Whether the steps have their own lengths (a varying learning rate, ``step_sizes``)."""
        return self.step_sizes is not None

    def step_times(self) -> np.ndarray:
        """t_k of the steps k = 0..T: t0 + Σ_{j<k} Δt_j (t0 + k·dt without a schedule), (T + 1,)."""
        if self.step_sizes is None:
            return self.t0 + np.arange(self.n_steps + 1) * self.dt
        return self.t0 + np.concatenate([[0.0], np.cumsum(self.step_sizes)])

    def clock_to_time(self, u) -> np.ndarray:
        """The times t of solver-clock times u (the identity without a schedule; linear within a step)."""
        u = np.asarray(u, dtype=np.float64)
        if self.step_sizes is None:
            return u
        x = (u - self.t0) / self.dt
        return np.interp(x, np.arange(self.n_steps + 1), self.step_times())

    @property
    def reshuffled(self) -> bool:
        """Whether the noise is pinned within epochs (``steps_per_epoch`` given)."""
        return self.steps_per_epoch is not None

    def epoch_position(self) -> np.ndarray:
        """m_k, the position of every coefficient step k within its epoch (reshuffled epochs)."""
        return (self.epoch_phase + np.arange(self.n_steps)) % self.steps_per_epoch

    def epoch_weights(self) -> np.ndarray:
        """The weight of the Itô terms per step: 1, or 1 − α(2m_k + 1) with reshuffled epochs and an expected-gradient
        drift, (T,)."""
        if not self.reshuffled or self.drift_source == "minibatch":
            return np.ones(self.n_steps)
        return 1.0 - self.batch_fraction * (2 * self.epoch_position() + 1)

    def brownian_motion(self, n: int, t0: Optional[float] = None, dt: Optional[float] = None, seed: int = 0,
                        stream: int = 0, **kwargs):
        """The driver of n trajectories: a :class:`GridBrownian`, or an :class:`EpochBrownian` with reshuffled epochs
        (its epochs aligned with the record's: step k is at position (epoch_phase + k) mod S)."""
        from .brownian import GridBrownian
        from .epoch_brownian import EpochBrownian

        t0 = self.t0 if t0 is None else float(t0)
        dt = self.dt if dt is None else float(dt)
        size = (int(n), self.brownian_size)
        if not self.reshuffled:
            return GridBrownian(t0, dt, size, seed=seed, stream=stream, **kwargs)
        if abs(dt / self.dt - 1) > 1e-9:
            raise ValueError(f"with reshuffled epochs the solver step must be the record's step dt = {self.dt}, "
                             f"got {dt}")
        kwargs.pop("n_steps", None)
        return EpochBrownian(t0 - self.epoch_phase * dt, dt, size, steps_per_epoch=self.steps_per_epoch,
                             batch_fraction=self.batch_fraction, seed=seed, stream=stream, **kwargs)

    @property
    def n_layers(self) -> int:
        return self.mu.shape[1]

    @property
    def n_steps(self) -> int:
        """T, the number of coefficient steps."""
        return self.mu.shape[0]

    @property
    def state_size(self) -> int:
        return self.n_layers

    @property
    def brownian_size(self) -> int:
        return self.n_layers

    @property
    def t1(self) -> float:
        """The end of the coefficient grid, t0 + T·dt."""
        return self.t0 + self.n_steps * self.dt

    def time_grid(self, every: int = 1, n_steps: Optional[int] = None) -> torch.Tensor:
        """float64 save times on the coefficient grid (every ``every`` steps, up to ``n_steps``)."""
        from .brownian import time_grid

        n = self.n_steps if n_steps is None else int(n_steps)
        return time_grid(self.t0 + n * self.dt, self.dt, every=every, t0=self.t0)

    def step_index(self, t) -> int:
        """The coefficient step k with t in [t_k, t_{k+1}) (robust to rounding of t)."""
        x = (float(t) - self.t0) / self.dt
        k = math.floor(x + 1e-6)
        if k < 0 or k > self.n_steps:
            raise ValueError(
                f"time {float(t)!r} is outside the coefficient grid [{self.t0}, {self.t1}] of the record"
            )
        return min(k, self.n_steps - 1)

    def _rows_for(self, ref: torch.Tensor):
        rows = self._rows
        if rows is None or rows[0] != (self.log_drift.data_ptr(), ref.device, ref.dtype):
            a = self.log_drift.to(device=ref.device, dtype=ref.dtype)
            b = self.diffusion.to(device=ref.device, dtype=ref.dtype)
            rows = ((self.log_drift.data_ptr(), ref.device, ref.dtype), a.unbind(0), b.unbind(0))
            self._rows = rows
        return rows[1], rows[2]

    def f(self, t, y: torch.Tensor) -> torch.Tensor:
        """Drift a_k (broadcast over trajectories)."""
        a, _ = self._rows_for(y)
        return a[self.step_index(t)].expand_as(y)

    def g(self, t, y: torch.Tensor) -> torch.Tensor:
        """Diagonal diffusion b_k (broadcast over trajectories)."""
        _, b = self._rows_for(y)
        return b[self.step_index(t)].expand_as(y)

    def g_prod(self, t, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _, b = self._rows_for(y)
        return b[self.step_index(t)] * v

    def f_and_g_prod(self, t, y: torch.Tensor, v: torch.Tensor):
        """(f, g·v) with one lookup of the step; what torchsde's Euler step calls."""
        a, b = self._rows_for(y)
        k = self.step_index(t)
        return a[k].expand_as(y), b[k] * v

    # -- state and outputs ---------------------------------------------------------------
    def initial_state(self, n: int, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
        """n copies of Z^(ℓ)(0), shape (n, L)."""
        z0 = self.z0.to(dtype=dtype or self.z0.dtype, device=device or self.z0.device)
        return z0.unsqueeze(0).repeat(int(n), 1)

    def log_lipschitz(self, ys: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        return ys if per_layer else ys.sum(-1)

    def lipschitz(self, ys: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """K = exp Σ_ℓ Z^(ℓ) (Thm 16), or the per-layer K^(ℓ)."""
        return self.log_lipschitz(ys, per_layer).exp()

    def moments(self, n_steps: Optional[int] = None) -> LipschitzMoments:
        """Thm 17's E[Z], Var[Z], E[K], Var[K] on the step grid t0 + k·dt, k = 0..n_steps.

        Computed by :func:`sdelip.lipschitz_moments` from the network sums of the
        coefficients with the ``include_*`` switches applied (with all terms on this is
        exactly Thm 17: E[K] = K0 exp ∫(μ_Z + κ_Z), Var[K] = E[K]² (exp ∫λ_Z² − 1)).
        Times are relative to t0.
        """
        a, b2 = self.log_coefficients()
        n = self.n_steps if n_steps is None else int(n_steps)
        if self.reshuffled:
            return self._pinned_moments(a[:n], b2[:n])
        a, b2 = a[:n].sum(1), b2[:n].sum(1)
        K0 = math.exp(float(self.Z0.sum()))
        # lipschitz_moments integrates μ + κ − ½λ² and λ²: give it (a + ½b², 0, b²).
        m = lipschitz_moments(K0, a + 0.5 * b2, np.zeros_like(a), b2, self.dt)
        if self.step_sizes is not None:  # the steps' own times
            m = LipschitzMoments(t=self.step_times()[: n + 1] - self.t0, mean_Z=m.mean_Z, var_Z=m.var_Z,
                                 mean_K=m.mean_K, var_K=m.var_K)
        return m

    def _pinned_moments(self, a: np.ndarray, b2: np.ndarray) -> LipschitzMoments:
        """E[Z], Var[Z], E[K], Var[K] of the reshuffled-epoch system (module docstring), steps 0..len(a)."""
        T, dt, alpha = a.shape[0], self.dt, self.batch_fraction
        b = np.sqrt(b2)  # (T, L)
        Z0 = float(self.Z0.sum())
        mean_Z = Z0 + np.concatenate([[0.0], np.cumsum(a.sum(1)) * dt])
        cum_b2 = np.concatenate([np.zeros((1, b.shape[1])), np.cumsum(b2, 0) * dt])
        epoch = (self.epoch_phase + np.arange(T)) // self.steps_per_epoch
        var_L = np.zeros((T + 1, b.shape[1]))
        done = np.zeros(b.shape[1])  # Σ over finished epochs of (Σ_j ‖λ_j‖)²
        part = np.zeros(b.shape[1])  # Σ_j ‖λ_j‖ of the current epoch so far
        for k in range(T):
            if k > 0 and epoch[k] != epoch[k - 1]:
                done, part = done + part**2, np.zeros_like(part)
            part = part + b[k]
            var_L[k + 1] = cum_b2[k + 1] - alpha * dt * (done + part**2)
        var_Z = np.maximum(var_L, 0.0).sum(1)  # independent layers (Assumption 3)
        mean_K = np.exp(mean_Z + 0.5 * var_Z)
        return LipschitzMoments(t=self.step_times()[: T + 1] - self.t0, mean_Z=mean_Z, var_Z=var_Z, mean_K=mean_K,
                                var_K=mean_K**2 * np.expm1(var_Z))

    def extra_repr(self) -> str:
        off = [n for n, on in (("drift", self.include_drift), ("noise_curvature", self.include_noise_curvature),
                               ("ito_correction", self.include_ito_correction),
                               ("diffusion", self.include_diffusion)) if not on]
        epochs = (f", steps_per_epoch={self.steps_per_epoch}, batch_fraction={self.batch_fraction:.6g}, "
                  f"drift_source={self.drift_source!r}" if self.reshuffled else "")
        sched = (f", step_sizes={self.step_sizes.min():g}..{self.step_sizes.max():g}" if self.scheduled else "")
        return (f"layers={self.layer_names}, steps={self.n_steps}, dt={self.dt}" + sched + epochs
                + (f", without={off}" if off else ""))
