"""The parameter SDE of Def 4 as a torchsde system, estimated live from a model and its data.

Def 4 (Eq. 3) models SGD with learning rate η, per layer ℓ, as the Itô SDE

    d vec θ^(ℓ) = −vec ∇^(ℓ)L(θ) dt + √η [Σ^(ℓ)]^{1/2} dB^(ℓ),

with block-diagonal gradient noise across layers (Assumption 3). :class:`ParameterSDE`
integrates it for a batch of trajectories with torchsde, estimating its coefficients
at every trajectory's own parameters at every evaluation:

- drift: −∇L(θ) (plus −λ_wd θ with weight decay), the *expected* gradient, on the whole
  training set when it is small or on an independent large batch per trajectory, so
  that the drift does not carry mini-batch noise a second time (docs/theory.md §2);
- diffusion: √η times the exact low-rank factor G = Ωᵀ/√M of Prop 5's Σ̂ = ΩᵀΩ/M from
  a fresh mini-batch of M samples, driven by an M-dimensional Brownian motion per
  layer (docs/theory.md §3): GGᵀ = Σ̂, so the SDE has the law of Eq. 3 with Σ = Σ̂, and no
  decomposition (Prop 7) is needed. Column i of G is (g_i − ḡ)/√(M(M−1)).

Every module that owns trainable parameters is one noise block with its own
M-dimensional Brownian motion. A tracked layer's bias sits in the block of its weight:
the same per-sample rows drive weight and bias, which is their exact joint noise.
``noise_coupling="shared"`` drops Assumption 3 instead: one M-dimensional Brownian
motion drives every block, so that G·dB = Σ_i c_i (g_i − ḡ) over the whole parameter
vector and the noise has SGD's full covariance Σ̂ across layers (one mini-batch moves
all layers at once); the block-diagonal Σ of Assumption 3 is its diagonal blocks.

Two engines evaluate the diffusion (``engine=``):

- ``"factored"`` (default): the Euler increment G·dB = Σ_i (c_i − c̄) g_i is the gradient
  of a weighted mini-batch loss, obtained from one backward pass per trajectory, all
  trajectories batched in one ``torch.func`` call (:mod:`sdelip.sde.noise.factored`). Cost:
  about the gradient evaluations themselves; memory O(n·P) plus one mini-batch's
  activations per trajectory of a chunk; no per-sample gradient is ever formed.
- ``"materialised"``: per-sample gradients by ``vmap(grad)`` over samples and
  trajectories, O(n·M·P) memory; the reference the factored engine is tested against,
  and the engine of a user-supplied ``gradient_fn``.

A drift estimated on an independent batch of B samples carries noise of covariance
Σ·M/B (Σ = Var[g]/M); an Euler step of length dt then has the step covariance
η dt Σ + dt² Σ M/B instead of Def 4's η dt Σ. With ``grad_source="batch"`` the
diffusion is shrunk by s = √(1 − (dt/η)(M/B)), which restores Def 4's second moments
exactly for steps of length ``dt`` (default η, SGD's own step); B ≤ M·dt/η is refused.

torchsde calls the drift and the diffusion separately at the same (t, y); both come
from one cached evaluation (:meth:`ParameterSDE.evaluate`, an
:class:`~sdelip.sde.evaluation.Evaluation`), so they share the mini-batch. Euler uses
:meth:`ParameterSDE.f_and_g_prod`; the system has no dense diffusion ``g`` (torchsde's
``sdeint`` would build it at every call), so ``sdeint`` learns the noise size from its
``bm`` (e.g. :class:`~sdelip.sde.GridBrownian`). :class:`~sdelip.sde.DenseDiffusion`
adds the dense matrix, for tests and small models.

Extra state rows with their own drift and diffusion on the same Brownian motion compose
with the parameters through :class:`~sdelip.sde.evaluation.ExtraRows` (``extra_rows``):
the state is then [θ, extra] (Def 10's log K^(ℓ) rows, :class:`~sdelip.sde.LipschitzSDE`).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .._checks import (check_drift_noise, check_positive, check_sde_engine, check_sde_gradient_fn, check_sde_lr,
                       check_sde_noise_batch, check_sde_sampling)
from ..rules.inventory import TrackedLayer, tracked_layers
from ..core.spectral import DEFAULT_GAP_TOL
from .dense import DENSE_DIFFUSION_MAX
from .noise.estimator import model_estimator
from .evaluation import ChunkPlan, Evaluation, ExtraRows, NoiseObserver
from .noise.materialised import GradientEstimate
from .layout import ParamLayout
from .brownian import GridBrownian
from .epoch_brownian import EpochBrownian
from .._deprecation import take_deprecated
from .options import (DEPRECATED_PARAMETER_SDE_KEYWORDS, SPELLED, ComputeOptions, DriftOptions, NoiseOptions,
                      evolve)
from .noise.factor import centred_rows, factored_increments, reshuffled_evaluation, reshuffled_increments, rows_times

__all__ = ["ParameterSDE"]


class ParameterSDE(nn.Module):
    """Def 4's parameter SDE for a batch of trajectories, coefficients estimated live.

    The state is a batch of flattened parameter vectors, one row per trajectory
    (every trainable parameter, tracked weights and the rest, in the order of
    :attr:`layout`); the model is evaluated on it functionally (``torch.func``), never
    copied. ``noise_type="general"``, ``sde_type="ito"``; the Brownian motion has
    :attr:`brownian_size` = (number of noise blocks) × M coordinates.

    Example::

        sde = ParameterSDE(model, loader, lr=0.05)
        bm = GridBrownian(0.0, 0.05, (64, sde.brownian_size))
        ys = torchsde.sdeint(sde, sde.initial_state(64), ts, bm=bm, dt=0.05, method="euler")
        K = sde.lipschitz(ys)          # Π σ1(θ(t)), shape (len(ts), 64)

    Composition: :meth:`evaluate` is the cached evaluation at (t, y) that ``f`` and
    ``g_prod`` share, :meth:`noise_pass` runs its noise pass (with an observer of the
    per-layer inputs and output gradients), and :attr:`extra_rows` (None here) holds
    extra state rows, :class:`~sdelip.sde.evaluation.ExtraRows`, evaluated with it.

    Args:
        model: the network (its parameters give the initial state).
        loader: the training data: a ``DataLoader`` (its batch size is the default M),
            a map-style dataset of (x, y) pairs or a tuple (X, Y) of tensors. Not needed
            with ``gradient_fn``.
        lr: the learning rate η (noise scale √η; the natural solver step dt = η).
        loss_fn: ``loss_fn(output, target)`` returning the mean loss of a batch (for a loader of
            dict batches, as Hugging Face's: ``loss_fn(output, batch)`` returning the per-sample
            losses, default :func:`sdelip.integrations.batches.per_sample_loss`; the model is then
            wrapped by :func:`sdelip.integrations.batches.hf_model_and_data`, docs/integrations.md)
            (default cross-entropy); the per-sample loss is its value on one sample.
        noise_batch_size: M, samples per noise mini-batch (default: the loader's batch size).
        sampling: ``"iid"`` (default): the noise of independent mini-batches (Def 4);
            ``"reshuffle"``: the noise of SGD with reshuffled epochs (mini-batches without
            replacement within a permutation per epoch): the dataset-level factor
            G = D(θ)/√(M(N − 1)) (columns g_i − ∇L over all N training samples) driven by
            an N-dimensional :class:`~sdelip.sde.EpochBrownian` pinned within each epoch of
            ⌊N/M⌋ steps (:meth:`brownian_motion`); drift and noise from one weighted pass
            over the data (:mod:`sdelip.sde.noise.reshuffle`; docs/sde.md, "Reshuffled epochs").
            Needs a materialised training set and the full-set drift.
        seed: seed of the data sampling (:meth:`reseed` restarts it).
        engine: ``"auto"`` (factored, or materialised with ``gradient_fn``),
            ``"factored"`` or ``"materialised"`` (see the module docstring).
        gradient_fn: replaces the model-and-data estimator: a callable
            ``gradient_fn(params) -> GradientEstimate`` with params {name: (n, *shape)};
            requires ``noise_batch_size`` and the materialised engine.
        layers: the tracked layers (default :func:`sdelip.tracked_layers`; to order them by a
            forward pass, ``layers=sdelip.tracked_layers(model, example_input)``).
        drift: a :class:`~sdelip.sde.options.DriftOptions`: weight decay λ_wd, where the
            expected gradient comes from (``source``, ``full_max``, ``batch_size``) and the
            diffusion's compensation for a batch drift (``compensate``, ``dt``).
        noise: a :class:`~sdelip.sde.options.NoiseOptions`: the coupling of the noise blocks
            (``"layers"``: Assumption 3; ``"shared"``: SGD's full covariance) and one shared
            noise mini-batch for all trajectories.
        compute: a :class:`~sdelip.sde.options.ComputeOptions`: trajectory and data chunks,
            the memory budget, the largest cached dataset, the dense diffusion switch.

    The flat keywords of earlier releases (``weight_decay``, ``grad_source``, ``full_max``,
    ``grad_batch_size``, ``compensate_drift_noise``, ``dt``, ``noise_coupling``,
    ``shared_noise_batch``, ``traj_chunk``, ``chunk_bytes``, ``data_chunk``, ``max_cached``,
    ``dense_diffusion``, ``example_input``, ``gap_tol``, ``on_degenerate``) still work for
    this release with a DeprecationWarning naming their replacement.
    """

    def __init__(
        self,
        model: nn.Module,
        loader=None,
        lr: float = None,
        *,
        loss_fn: Optional[Callable] = None,
        noise_batch_size: Optional[int] = None,
        sampling: str = "iid",
        seed: int = 0,
        engine: str = "auto",
        gradient_fn: Optional[Callable[[Dict[str, torch.Tensor]], GradientEstimate]] = None,
        layers: Optional[list] = None,
        drift: Optional[DriftOptions] = None,
        noise: Optional[NoiseOptions] = None,
        compute: Optional[ComputeOptions] = None,
        **deprecated,
    ):
        super().__init__()
        moved = take_deprecated(type(self).__name__, deprecated, DEPRECATED_PARAMETER_SDE_KEYWORDS,
                                {**SPELLED, "log_k": "LipschitzSDE(log_k=LogKOptions(...)); ParameterSDE does not use it"})
        drift = evolve(drift, DriftOptions, moved.get("drift", {}))
        noise = evolve(noise, NoiseOptions, moved.get("noise", {}))
        compute = evolve(compute, ComputeOptions, moved.get("compute", {}))
        log_k = moved.get("log_k", {})
        example_input = moved.get("layers", {}).get("example_input")
        self.drift_options, self.noise_options, self.compute_options = drift, noise, compute
        self.lr = check_sde_lr(lr, "ParameterSDE")
        self.dt = check_positive(drift.dt, "dt") if drift.dt is not None else self.lr
        self.noise_type = "general"
        self.sde_type = "ito"
        if gradient_fn is None and loader is not None:  # dict batches (Hugging Face): sdelip.integrations.batches
            from ..integrations.batches import adapt_dict_data

            model, loader, loss_fn = adapt_dict_data(model, loader, loss_fn)
        self.model = model
        self.layers: list[TrackedLayer] = list(layers) if layers is not None else tracked_layers(model, example_input)
        self.layout = ParamLayout(model, self.layers)
        self.weight_decay = drift.weight_decay
        self.gap_tol = float(log_k.get("gap_tol", DEFAULT_GAP_TOL))  # the log K rows' (LipschitzSDE)
        self.on_degenerate = log_k.get("on_degenerate", "warn")
        self.chunks = ChunkPlan(compute.traj_chunk, compute.chunk_bytes)
        self.dense_diffusion = compute.dense_diffusion
        self.noise_coupling = check_sde_sampling(sampling, noise.coupling)
        self.sampling = sampling
        self.reshuffle = None
        engine = check_sde_engine(engine)
        self.noise_scale = 1.0
        self.factored = None
        #: Extra state rows composed with θ (an :class:`ExtraRows`), or None.
        self.extra_rows: Optional[ExtraRows] = None
        if gradient_fn is not None:
            check_sde_gradient_fn(sampling, engine, noise_batch_size)
            self.data = None
            self.gradient_fn = gradient_fn
            self.M = int(noise_batch_size)
            self.engine = "materialised"
        else:
            est = model_estimator(model, self.layout, self.layers, loader, sampling=sampling, engine=engine,
                                  loss_fn=loss_fn, M=noise_batch_size, grad_source=drift.source,
                                  full_max=drift.full_max, grad_batch_size=drift.batch_size,
                                  shared_noise_batch=noise.shared_batch, seed=seed, traj_chunk=compute.traj_chunk,
                                  data_chunk=compute.data_chunk, max_cached=compute.max_cached)
            self.data, self.gradient_fn, self.M, self.engine = est.data, est.gradient_fn, est.M, est.engine
            self.factored, self.reshuffle = est.factored, est.reshuffle
            if self.gradient_fn.grad_source == "batch" and drift.compensate:
                self.noise_scale = self._drift_noise_compensation(self.gradient_fn.grad_batch_size)
        check_sde_noise_batch(self.M)
        self._cache: Optional[Evaluation] = None
        self.n_evaluations = 0

    def _drift_noise_compensation(self, B: int) -> float:
        """s = √(1 − (dt/η)(M/B)): the diffusion factor that keeps Def 4's step covariance."""
        return math.sqrt(1.0 - check_drift_noise(self.dt, self.lr, self.M, B))

    # -- sizes --------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """P, the number of trainable parameters (the θ part of the state)."""
        return self.layout.size

    @property
    def state_size(self) -> int:
        """Width of the state vector: P, and the extra rows' width."""
        return self.layout.size + (0 if self.extra_rows is None else self.extra_rows.width)

    @property
    def noise_width(self) -> int:
        """Columns of one noise block's factor G: M, or N (all training samples) with reshuffled sampling."""
        return len(self.data) if self.sampling == "reshuffle" else self.M

    @property
    def brownian_size(self) -> int:
        """Brownian coordinates: one M-dimensional block per noise block (Assumption 3), or M when shared (N reshuffled)."""
        return self.noise_width if self.noise_coupling == "shared" else len(self.layout.blocks) * self.M

    def brownian_slice(self, block: int) -> slice:
        """The Brownian coordinates that drive noise block ``block``."""
        if self.noise_coupling == "shared":
            return slice(0, self.noise_width)
        return slice(block * self.M, (block + 1) * self.M)

    @property
    def steps_per_epoch(self) -> Optional[int]:
        """S = ⌊N/M⌋ SGD steps per epoch with reshuffled sampling (None for iid)."""
        return len(self.data) // self.M if self.sampling == "reshuffle" else None

    def brownian_motion(self, n: int, t0: float = 0.0, dt: Optional[float] = None, seed: int = 0, stream: int = 0,
                        **kwargs):
        """The driver of n trajectories from t0 (an epoch start): a :class:`GridBrownian`, or with reshuffled
        sampling an :class:`EpochBrownian` pinned over every ⌊N/M⌋ steps of dt = η (batch fraction M/N).

        ``kwargs`` (dtype, device, block_steps, n_steps, on_block) go to the driver.
        """
        dt = self.lr if dt is None else float(dt)
        size = (int(n), int(self.brownian_size))
        if self.sampling != "reshuffle":
            return GridBrownian(t0, dt, size, seed=seed, stream=stream, **kwargs)
        if abs(dt / self.lr - 1) > 1e-9:
            raise ValueError(f"the epoch-pinned driver has one SGD step per grid step: dt must be η = {self.lr}, "
                             f"got {dt}")
        return EpochBrownian(t0, dt, size, steps_per_epoch=self.steps_per_epoch,
                             batch_fraction=self.M / len(self.data), seed=seed, stream=stream, **kwargs)

    @property
    def layer_names(self) -> list:
        return [layer.name for layer in self.layers]

    def reseed(self, seed: int) -> None:
        """Restart the data sampling from ``seed`` (trajectory chunks use independent seeds)."""
        if self.data is not None:
            self.data.reseed(seed)
        self._cache = None

    # -- state -------------------------------------------------------------------------
    def initial_state(self, n: int, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
        """n copies of the model's current parameters (and the extra rows' start), shape (n, state_size)."""
        theta = self.layout.flatten_model(self.model)
        theta = theta.to(dtype=dtype or theta.dtype, device=device or theta.device)
        if self.extra_rows is not None:
            theta = theta.unsqueeze(0)
            return torch.cat([theta, self.extra_rows.initial_state(self, theta)], 1).repeat(int(n), 1)
        return theta.unsqueeze(0).repeat(int(n), 1)

    def params(self, ys: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The parameters {name: (..., *shape)} of states ys (..., state_size)."""
        return self.layout.unflatten(ys[..., : self.n_params])

    def weight_matrices(self, ys: torch.Tensor) -> list:
        """Per tracked layer, the weight matrices θ^(ℓ) of states ys: (..., m, n) each."""
        p = self.params(ys)
        return [p[w].reshape(*ys.shape[:-1], layer.shape[0], -1) for w, layer in zip(self.layout.weight_names, self.layers)]

    @property
    def uses(self) -> torch.Tensor:
        """c_ℓ, how many times each layer's weight is applied per forward pass (1 unless tied)."""
        return torch.tensor([float(layer.uses) for layer in self.layers])

    def direct_lipschitz(self, ys: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """K = Π_ℓ σ1(θ^(ℓ))^{c_ℓ} computed from the simulated parameters (Def 10, Prop 8–9).

        A weight applied c_ℓ times per forward pass (tied weights) counts c_ℓ times in the
        product bound, as in the tracker (docs/tracking.md).

        Args:
            ys: states (..., state_size), e.g. sdeint's output (T, n, state_size).
            per_layer: return the per-layer σ1 as (..., L) instead of the product.
        """
        with torch.no_grad():
            s1 = torch.stack([torch.linalg.svdvals(W)[..., 0] for W in self.weight_matrices(ys)], -1)
        return s1 if per_layer else s1.pow(self.uses.to(s1)).prod(-1)

    def lipschitz(self, ys: torch.Tensor) -> torch.Tensor:
        """The Lipschitz bound K(t) of states ys; for the parameter SDE, :meth:`direct_lipschitz`."""
        return self.direct_lipschitz(ys)

    def chunk_sizes(self, ref: torch.Tensor) -> tuple:
        """(trajectories per noise pass, per expected-gradient call, samples per call): :meth:`ChunkPlan.sizes`."""
        return self.chunks.sizes(self, ref)

    # -- the evaluation ------------------------------------------------------------------
    def evaluate(self, t, y: torch.Tensor, v: Optional[torch.Tensor] = None):
        """Def 4's coefficients at (t, y), cached: what ``f``, ``g_prod`` and ``f_and_g_prod`` share.

        A new state (another tensor, or one changed in place) or time is a fresh
        evaluation: a new noise mini-batch (and expected-gradient batches), then the
        extra rows' coefficients from the same noise pass (:attr:`extra_rows`).

        Args:
            t: the time.
            y: the states (n, state_size); the θ part is ``y[:, :P]``.
            v: Brownian increments (n, brownian_size), or None.

        Returns:
            (the :class:`Evaluation`, the θ part of G·v (n, P) or None without v).
        """
        c = self._cache
        tf = float(t)
        if c is not None and c.holds(tf, y):
            return c, (None if v is None else self.noise_pass(c, v))
        if self.sampling == "reshuffle" and v is not None:  # drift and increments share the pass over the data
            self.n_evaluations += 1
            theta = y[:, : self.n_params].detach()
            c, inc = reshuffled_evaluation(self, tf, y, theta, self.layout.unflatten(theta), theta.shape[0], v)
        else:
            c = self.draw(tf, y)
            rows = self.extra_rows
            observer = None if rows is None else rows.observer(self, c)
            inc = None if v is None and observer is None else self.noise_pass(c, v, observer)
            if rows is not None:
                c.extra = rows.evaluate(self, c, observer)
        self._cache = c
        return c, inc

    def draw(self, t: float, y: torch.Tensor) -> Evaluation:
        """A fresh evaluation at (t, y), never cached: the θ drift and the noise mini-batch (materialised: its rows).

        Both engines draw the same data in the same order: the expected-gradient batches
        (``grad_source="batch"``), then the noise mini-batches. :meth:`evaluate` calls it.
        """
        self.n_evaluations += 1
        theta = y[:, : self.n_params].detach()
        params = self.layout.unflatten(theta)
        n = theta.shape[0]
        if self.data is None:  # a user's gradient_fn
            est = self.gradient_fn(params)
            return Evaluation(t, y, self.theta_drift(theta, est.grad), params, est.grad, noise=centred_rows(self, n, est))
        noise_chunk, drift_chunk, data_chunk = self.chunk_sizes(theta)
        src = self.gradient_fn
        if self.sampling == "reshuffle":
            return reshuffled_evaluation(self, t, y, theta, params, n)
        grads = src.expected_gradient(params, traj_chunk=drift_chunk, data_chunk=data_chunk)
        c = Evaluation(t, y, self.theta_drift(theta, grads), params, grads, batch=src.noise_batch(n, theta))
        if self.engine == "materialised":
            per = src.per_sample_gradients(params, c.batch, traj_chunk=noise_chunk)
            c.noise = centred_rows(self, n, GradientEstimate(grad=grads, per_sample=per))
        return c

    def theta_drift(self, theta: torch.Tensor, grads: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Def 4's drift −∇L(θ) − λ_wd θ of the θ part, (n, P)."""
        grad = self.layout.flatten(grads).to(theta.dtype)
        if grad.shape[0] != theta.shape[0]:
            grad = grad.expand(theta.shape[0], -1)
        return -grad if not self.weight_decay else -(grad + self.weight_decay * theta)

    def column_scale(self) -> float:
        """√η s/√(M(M−1)): the factor of (g_i − ḡ) in G's columns (s the drift-noise compensation).

        With reshuffled sampling √η/√(M(N − 1)), the columns running over all N samples.
        """
        M = self.M
        if self.sampling == "reshuffle":
            return self.noise_scale * (self.lr / (M * (len(self.data) - 1))) ** 0.5
        return self.noise_scale * (self.lr / (M * (M - 1))) ** 0.5

    def noise_pass(self, ev: Evaluation, v: Optional[torch.Tensor] = None,
                   observer: Optional[NoiseObserver] = None) -> Optional[torch.Tensor]:
        """The noise pass of an evaluation: the θ part of G·v (n, P), or None without v.

        Materialised (``ev.noise`` set): the product with the rows, which ``observer.rows``
        sees. Factored: one weighted backward per trajectory over chunks of
        trajectories; ``observer.chunk`` sees every chunk's layer inputs and per-sample
        output gradients (captured only with an observer). Reshuffled: the weighted pass
        over the training set (no observer).
        """
        if ev.noise is not None:
            if observer is not None:
                observer.rows(ev.noise)
            return None if v is None else rows_times(self, ev.noise, v)
        if self.sampling == "reshuffle":
            return reshuffled_increments(self, ev, v)
        return factored_increments(self, ev, v, observer)

    def noise_rows(self, ev: Evaluation) -> list:
        """The columns of G as rows per parameter (n, M, numel) (N columns reshuffled).

        A factored evaluation gets them here, from per-sample gradients of its batch, once
        (:class:`DenseDiffusion`, tests).
        """
        if ev.noise is None:
            n = ev.y.shape[0]
            batch = ev.batch
            if self.sampling == "reshuffle":  # the columns of G run over the whole training set
                X, Y = self.data.full(device=ev.y.device, dtype=ev.y.dtype)
                batch = (X.expand(n, *X.shape), Y.expand(n, *Y.shape))
            per = self.gradient_fn.per_sample_gradients(ev.params, batch, traj_chunk=self.chunk_sizes(ev.y)[0])
            ev.noise = centred_rows(self, n, GradientEstimate(grad={}, per_sample=per))
        return ev.noise

    # -- torchsde ------------------------------------------------------------------------
    def f(self, t, y: torch.Tensor) -> torch.Tensor:
        """Drift: −∇L(θ) (− λ_wd θ) for the θ part (Def 4), then the extra rows' drift."""
        return self._state_drift(self.evaluate(t, y)[0], y)

    def _state_drift(self, ev: Evaluation, y) -> torch.Tensor:
        if ev.state_drift is None:
            drift = ev.drift
            if ev.extra is not None:
                drift = torch.cat([drift.to(y.dtype), ev.extra.drift], 1)
            if drift.shape[1] != y.shape[1]:  # a wider state: no drift beyond the system's rows
                drift = torch.cat([drift, drift.new_zeros(drift.shape[0], y.shape[1] - drift.shape[1])], 1)
            ev.state_drift = drift
        return ev.state_drift

    def g_prod(self, t, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Diffusion times v: per block, √η s Ωᵀ v_block/√M, without the dense matrix; then the extra rows."""
        ev, inc = self.evaluate(t, y, v)
        return self._state_increment(ev, y, v, inc)

    def f_and_g_prod(self, t, y: torch.Tensor, v: torch.Tensor):
        """(f, g·v) from one evaluation; this is what torchsde's Euler step calls."""
        ev, inc = self.evaluate(t, y, v)
        return self._state_drift(ev, y), self._state_increment(ev, y, v, inc)

    def _state_increment(self, ev: Evaluation, y, v, inc):
        out = y.new_zeros(y.shape[0], y.shape[1])
        P = self.n_params
        out[:, :P] = inc
        if self.extra_rows is not None:
            self.extra_rows.g_prod(self, ev.extra, v, out[:, P : P + self.extra_rows.width])
        return out

    @property
    def has_dense_diffusion(self) -> bool:
        """Whether :class:`~sdelip.sde.DenseDiffusion` builds the dense matrix (see ``dense_diffusion``)."""
        if self.dense_diffusion is not None:
            return bool(self.dense_diffusion)
        return self.state_size * self.brownian_size <= DENSE_DIFFUSION_MAX

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, M={self.M}, params={self.n_params}, blocks={len(self.layout.blocks)}, "
            f"engine={self.engine!r}, sampling={self.sampling!r}, layers={self.layer_names}"
        )
