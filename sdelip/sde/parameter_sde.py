"""The parameter SDE of Def 4 as a torchsde system, estimated live from a model and its data.

Def 4 (Eq. 3) models SGD with learning rate η, per layer ℓ, as the Itô SDE

    d vec θ^(ℓ) = −vec ∇^(ℓ)L(θ) dt + √η [Σ^(ℓ)]^{1/2} dB^(ℓ),

with block-diagonal gradient noise across layers (Assumption 3). :class:`ParameterSDE`
integrates it for a batch of trajectories with torchsde, estimating its coefficients
at every trajectory's own parameters at every evaluation:

- drift: −∇L(θ) (plus −λ_wd θ with weight decay), the *expected* gradient, on the whole
  training set when it is small or on an independent large batch per trajectory, so
  that the drift does not carry mini-batch noise a second time (THEORY.md §5);
- diffusion: √η times the exact low-rank factor G = Ωᵀ/√M of Prop 5's Σ̂ = ΩᵀΩ/M from
  a fresh mini-batch of M samples, driven by an M-dimensional Brownian motion per
  layer (THEORY.md §2): GGᵀ = Σ̂, so the SDE has the law of Eq. 3 with Σ = Σ̂, and no
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
  trajectories batched in one ``torch.func`` call (:mod:`sdelip.sde.weighted_noise`). Cost:
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
from one cached evaluation, so they share the mini-batch. Euler uses
:meth:`ParameterSDE.f_and_g_prod`, which never builds the dense
(batch, state, brownian) diffusion matrix; :meth:`ParameterSDE.g` does, for tests. The
dense ``g`` exists only while it is small (``dense_diffusion``): torchsde's ``sdeint``
evaluates every diffusion method it finds once, so at scale ``sdeint`` must be given a
``bm`` (e.g. :class:`~sdelip.sde.GridBrownian`) to learn the noise size from.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .._checks import check_positive
from ..engines import EngineError
from ..layers import TrackedLayer, tracked_layers
from ..spectral import DEFAULT_GAP_TOL
from .weighted_noise import FactoredNoise
from .data import DataSource
from .gradients import GradientEstimate, ModelGradients, activation_numel
from .layout import ParamLayout
from .brownian import GridBrownian
from .epoch_brownian import EpochBrownian
from .reshuffle import ReshufflePass

__all__ = ["ParameterSDE"]

#: Largest dense diffusion matrix (elements per trajectory, state × Brownian) for which
#: ``g`` is offered by default (``dense_diffusion=None``).
DENSE_DIFFUSION_MAX = 1 << 22
#: Default memory budget of one chunk of trajectories (bytes) on CPU; on CUDA a quarter
#: of the free device memory.
CHUNK_BYTES = 512 << 20
#: On CPU, at most this many samples (trajectories × samples) per batched call: beyond it
#: stacking trajectories only costs cache (measured on the paper's MLP: 16 full-set
#: gradients 5.05 s one trajectory at a time, 5.9 s all at once).
CPU_ROWS_PER_CALL = 4096


class _Coefficients:
    """One evaluation of the coefficients at (t, y) (cached; shared by f, g and g_prod)."""

    __slots__ = ("t", "y", "version", "drift", "noise", "batch", "params", "grad", "log_drift", "lam", "terms")

    def __init__(self, t, y, drift, noise=None, batch=None, params=None, grad=None):
        self.t = t
        self.y = y
        self.version = y._version
        self.drift = drift  # (n, d)
        self.noise = noise  # materialised: per parameter (layout order), (n, M, numel): √η s (g_i − ḡ)/√(M(M−1))
        self.batch = batch  # factored: the noise mini-batch (X, Y)
        self.params = params  # the trajectories' parameters {name: (n, *shape)}
        self.grad = grad  # the expected gradient {name: (n or 1, *shape)}
        self.log_drift = None  # (n, L) for LipschitzSDE
        self.lam = None  # (n, L, M) for LipschitzSDE
        self.terms = None  # dict of (n, L) for LipschitzSDE


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

    Args:
        model: the network (its parameters give the initial state).
        loader: the training data: a ``DataLoader`` (its batch size is the default M),
            a map-style dataset of (x, y) pairs or a tuple (X, Y) of tensors. Not needed
            with ``gradient_fn``.
        lr: the learning rate η (noise scale √η; the natural solver step dt = η).
        loss_fn: ``loss_fn(output, target)`` returning the mean loss of a batch
            (default cross-entropy); the per-sample loss is its value on one sample.
        noise_batch_size: M, samples per noise mini-batch (default: the loader's batch size).
        grad_source: where the expected gradient comes from: ``"full"`` (the training
            set), ``"batch"`` (an independent batch of ``grad_batch_size`` samples per
            trajectory and evaluation, with the diffusion shrunk to keep Def 4's step
            covariance, see the module docstring) or ``"auto"`` (full if the training set
            has at most ``full_max`` samples, batch otherwise).
        full_max: threshold of ``"auto"``.
        grad_batch_size: B, size of the independent expected-gradient batch.
        compensate_drift_noise: shrink the diffusion by √(1 − (dt/η)(M/B)) when the drift
            comes from batches (default); False keeps the full diffusion.
        dt: the Euler step the compensation is calibrated for (default η).
        shared_noise_batch: draw one noise mini-batch per evaluation for all
            trajectories instead of one per trajectory.
        noise_coupling: ``"layers"`` (default with ``sampling="iid"``): an independent
            M-dimensional Brownian motion per noise block, block-diagonal noise across
            layers (Assumption 3); ``"shared"``: one M-dimensional Brownian motion for all
            blocks, the full covariance of the mini-batch gradient across layers (SGD's own
            noise; the only coupling, and the default, with ``sampling="reshuffle"``).
        sampling: ``"iid"`` (default): the noise of independent mini-batches (Def 4);
            ``"reshuffle"``: the noise of SGD with reshuffled epochs (mini-batches without
            replacement within a permutation per epoch): the dataset-level factor
            G = D(θ)/√(M(N − 1)) (columns g_i − ∇L over all N training samples) driven by
            an N-dimensional :class:`~sdelip.sde.EpochBrownian` pinned within each epoch of
            ⌊N/M⌋ steps (:meth:`brownian_motion`); drift and noise from one weighted pass
            over the data (:mod:`sdelip.sde.reshuffle`; docs/sde.md, "Reshuffled epochs").
            Needs a materialised training set and the full-set drift.
        weight_decay: λ_wd of SGD's L2 penalty: the drift becomes −(∇L + λ_wd θ).
        seed: seed of the data sampling (:meth:`reseed` restarts it).
        layers: the tracked layers (default :func:`sdelip.tracked_layers`).
        example_input: passed to :func:`sdelip.tracked_layers` to order the layers.
        gradient_fn: replaces the model-and-data estimator: a callable
            ``gradient_fn(params) -> GradientEstimate`` with params {name: (n, *shape)};
            requires ``noise_batch_size`` and the materialised engine.
        engine: ``"auto"`` (factored, or materialised with ``gradient_fn``),
            ``"factored"`` or ``"materialised"`` (see the module docstring).
        traj_chunk: trajectories per batched gradient call (default: from ``chunk_bytes``).
        chunk_bytes: memory budget of one chunk of trajectories (default 512 MiB on CPU,
            a quarter of the free memory on CUDA).
        data_chunk: samples per batched call of the expected gradient.
        max_cached: largest dataset materialised in memory (see ``DataSource``).
        dense_diffusion: offer the dense diffusion matrix ``g`` (True, False, or None:
            only while state × Brownian size is at most 2²² per trajectory).
        gap_tol: relative-gap tolerance of Assumption 11 (Lipschitz terms).
        on_degenerate: ``"warn"``, ``"raise"`` or ``"ignore"`` for a degenerate σ1.
    """

    def __init__(
        self,
        model: nn.Module,
        loader=None,
        lr: float = None,
        *,
        loss_fn: Optional[Callable] = None,
        noise_batch_size: Optional[int] = None,
        grad_source: str = "auto",
        full_max: int = 10_000,
        grad_batch_size: int = 4096,
        compensate_drift_noise: bool = True,
        dt: Optional[float] = None,
        shared_noise_batch: bool = False,
        noise_coupling: Optional[str] = None,
        sampling: str = "iid",
        weight_decay: float = 0.0,
        seed: int = 0,
        layers: Optional[list] = None,
        example_input: Optional[torch.Tensor] = None,
        gradient_fn: Optional[Callable[[Dict[str, torch.Tensor]], GradientEstimate]] = None,
        engine: str = "auto",
        traj_chunk: Optional[int] = None,
        chunk_bytes: Optional[int] = None,
        data_chunk: int = 4096,
        max_cached: int = 50_000,
        dense_diffusion: Optional[bool] = None,
        gap_tol: float = DEFAULT_GAP_TOL,
        on_degenerate: str = "warn",
    ):
        super().__init__()
        if lr is None:
            raise TypeError("ParameterSDE needs the learning rate lr (η)")
        self.lr = check_positive(lr, "lr")
        self.dt = check_positive(dt, "dt") if dt is not None else self.lr
        self.noise_type = "general"
        self.sde_type = "ito"
        self.model = model
        self.layers: list[TrackedLayer] = list(layers) if layers is not None else tracked_layers(model, example_input)
        self.layout = ParamLayout(model, self.layers)
        self.weight_decay = float(weight_decay)
        self.gap_tol = float(gap_tol)
        self.on_degenerate = on_degenerate
        self.traj_chunk = None if traj_chunk is None else int(traj_chunk)
        self.chunk_bytes = None if chunk_bytes is None else int(chunk_bytes)
        self.dense_diffusion = dense_diffusion
        if sampling not in ("iid", "reshuffle"):
            raise ValueError(f"sampling must be 'iid' (independent mini-batches) or 'reshuffle', got {sampling!r}")
        self.sampling = sampling
        if noise_coupling is None:
            noise_coupling = "shared" if sampling == "reshuffle" else "layers"
        if noise_coupling not in ("layers", "shared"):
            raise ValueError(f"noise_coupling must be 'layers' (Assumption 3) or 'shared', got {noise_coupling!r}")
        if sampling == "reshuffle" and noise_coupling != "shared":
            raise NotImplementedError(
                "sampling='reshuffle' drives every layer with the one N-dimensional epoch-pinned Brownian motion "
                "(one permutation moves all layers): use noise_coupling='shared' (the default with reshuffle)"
            )
        self.noise_coupling = noise_coupling
        self.reshuffle = None
        engine = str(engine).lower()
        if engine not in ("auto", "factored", "materialised", "materialized"):
            raise ValueError(f"engine must be 'auto', 'factored' or 'materialised', got {engine!r}")
        engine = "materialised" if engine == "materialized" else engine
        self.noise_scale = 1.0
        self.factored = None
        if gradient_fn is not None:
            if sampling == "reshuffle":
                raise ValueError("sampling='reshuffle' needs the training data (its noise runs over all N samples), "
                                 "not a gradient_fn")
            if engine == "factored":
                raise ValueError("a gradient_fn returns per-sample gradients: it needs engine='materialised'")
            if noise_batch_size is None:
                raise TypeError("gradient_fn needs noise_batch_size (M, the number of per-sample gradients)")
            self.data = None
            self.gradient_fn = gradient_fn
            self.M = int(noise_batch_size)
            self.engine = "materialised"
        else:
            if loader is None:
                raise TypeError("ParameterSDE needs training data (loader) or a gradient_fn")
            self.data = DataSource(loader, max_cached=max_cached, seed=seed)
            M = noise_batch_size if noise_batch_size is not None else self.data.batch_size
            if M is None:
                raise TypeError("pass noise_batch_size (M): the training data has no batch size")
            if sampling == "reshuffle":
                if grad_source == "batch":
                    raise ValueError("sampling='reshuffle' computes the drift on the whole training set, in the pass "
                                     "that gives the noise: grad_source must be 'full' or 'auto'")
                if not self.data.sized or self.data.full() is None:
                    raise ValueError(f"sampling='reshuffle' needs a map-style training set small enough to "
                                     f"materialise (at most max_cached = {max_cached} samples)")
                grad_source = "full"
                if not 2 <= int(M) <= len(self.data):
                    raise ValueError(f"sampling='reshuffle' needs 2 <= M <= N, got M = {M}, N = {len(self.data)}")
            self.gradient_fn = ModelGradients(
                model, self.layout, self.data, loss_fn=loss_fn, noise_batch_size=M, grad_source=grad_source,
                full_max=full_max, grad_batch_size=grad_batch_size, shared_noise_batch=shared_noise_batch,
                traj_chunk=traj_chunk, data_chunk=data_chunk,
            )
            self.M = int(M)
            tied = [layer for layer in self.layers if layer.uses != 1 or layer.aliases]
            # the iid factored noise runs each tracked module's own forward: rules that apply .weight in it
            # (the reshuffled pass differentiates the whole model and needs no rule)
            other = [] if sampling == "reshuffle" else \
                [layer for layer in self.layers if not layer.rule.sde_factored or layer.attr != "weight"]
            self.engine = ("materialised" if tied or other else "factored") if engine == "auto" else engine
            if self.engine == "factored" and tied:
                t = tied[0]
                raise ValueError(
                    f"layer {t.name!r} applies its weight {t.uses} times (modules {(t.name, *t.aliases)}): the factored "
                    "noise needs each weight used by one call of one module; use engine='materialised' (or 'auto')"
                )
            if self.engine == "factored" and other:
                t = other[0]
                raise ValueError(
                    f"layer {t.name!r} ({t.kind}, rule {t.rule.name!r}) is not applied as its module's .weight by the "
                    "module's own forward, which the factored noise needs; use engine='materialised' (or 'auto')"
                )
            if self.engine == "factored" and sampling == "reshuffle":
                self.reshuffle = ReshufflePass(model, self.gradient_fn.loss_fn)
            elif self.engine == "factored":
                self.factored = FactoredNoise(model, self.layout, self.layers, self.gradient_fn.loss_fn)
                try:  # the samples on axis 0 of every tracked module, or the materialised engine
                    ref = next(p for p in model.parameters() if p.requires_grad)
                    self.factored.check_layout(self.data.example(device=ref.device, dtype=ref.dtype)[0])
                except EngineError:
                    if engine != "auto":
                        raise
                    self.engine, self.factored = "materialised", None
            if self.gradient_fn.grad_source == "batch" and compensate_drift_noise:
                self.noise_scale = self._drift_noise_compensation(self.gradient_fn.grad_batch_size)
        if self.M < 2:
            raise ValueError(f"the noise mini-batch needs M >= 2 samples (Prop 5 divides by M − 1), got {self.M}")
        self._cache: Optional[_Coefficients] = None
        self._chunks: Dict[tuple, tuple] = {}
        self.n_evaluations = 0

    def _drift_noise_compensation(self, B: int) -> float:
        """s = √(1 − (dt/η)(M/B)): the diffusion factor that keeps Def 4's step covariance."""
        excess = self.dt / self.lr * self.M / B
        if excess >= 1.0:
            raise ValueError(
                f"grad_source='batch' with grad_batch_size B = {B} and noise_batch_size M = {self.M}: the drift "
                f"estimate alone adds (dt/η)·M/B = {excess:.3g} ≥ 1 times the step covariance of SGD, which no "
                f"diffusion can compensate; use B > {math.floor(self.M * self.dt / self.lr)}, grad_source='full', "
                "or compensate_drift_noise=False"
            )
        return math.sqrt(1.0 - excess)

    # -- sizes --------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """P, the number of trainable parameters (the θ part of the state)."""
        return self.layout.size

    @property
    def state_size(self) -> int:
        """Width of the state vector."""
        return self.layout.size

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
        """n copies of the model's current parameters, shape (n, state_size)."""
        theta = self.layout.flatten_model(self.model)
        theta = theta.to(dtype=dtype or theta.dtype, device=device or theta.device)
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

    # -- chunks --------------------------------------------------------------------------
    def _chunk_sizes(self, ref: torch.Tensor) -> tuple:
        """(trajectories per noise pass, per expected-gradient call, samples per expected-gradient call).

        ``traj_chunk`` fixes the trajectories; otherwise the budget (``chunk_bytes``) is
        divided by an estimate of one trajectory's working memory: its parameters and
        gradients, and the activations of M noise samples (of one data chunk for the
        expected gradient, whose samples per call are also cut to fit the budget).
        """
        x1, _ = self.data.example(device=ref.device, dtype=ref.dtype)
        key = (tuple(x1.shape[1:]), ref.dtype, str(ref.device))
        sizes = self._chunks.get(key)
        if sizes is None:
            budget = self.chunk_bytes
            if budget is None:
                budget = CHUNK_BYTES
                if ref.device.type == "cuda":
                    budget = torch.cuda.mem_get_info(ref.device)[0] // 4
            src = self.gradient_fn
            theta = self.layout.flatten_model(self.model).to(device=ref.device, dtype=ref.dtype)
            act = activation_numel(self.model, self.layout.unflatten(theta), src.consts(ref), x1)
            item = ref.element_size()
            P, M = self.n_params, self.M
            N = src.grad_batch_size if src.grad_source == "batch" else len(self.data)
            rows = max(1, min(N, src.data_chunk, budget // (3 * act * item)))
            per_noise = item * (3 * M * act + 4 * P + (3 * M * P if self.engine == "materialised" else 0))
            per_drift = item * (3 * rows * act + 3 * P)
            chunks = [int(max(1, budget // per)) for per in (per_noise, per_drift)]
            if ref.device.type == "cpu":  # batching trajectories gains nothing once the matrices are this tall
                chunks = [max(1, min(c, CPU_ROWS_PER_CALL // r)) for c, r in zip(chunks, (M, rows))]
            sizes = (*chunks, int(rows))
            self._chunks[key] = sizes
        if self.traj_chunk is not None:
            return self.traj_chunk, self.traj_chunk, sizes[2]
        return sizes

    # -- coefficients --------------------------------------------------------------------
    def _coefficients(self, t, y: torch.Tensor, v: Optional[torch.Tensor] = None):
        """The cached evaluation at (t, y), and with v the diffusion increment G·v (θ part, (n, P))."""
        c = self._cache
        tf = float(t)
        if c is not None and c.y is y and c.version == y._version and c.t == tf:
            return c, (None if v is None else self._increments(c, v))
        c, inc = self._evaluate(tf, y, v)
        self._cache = c
        return c, inc

    def _evaluate(self, t: float, y: torch.Tensor, v: Optional[torch.Tensor]):
        """Evaluate the coefficients at (t, y); returns (coefficients, increments G·v or None)."""
        if self.sampling == "reshuffle" and v is not None:  # drift and increments share the pass over the data
            self.n_evaluations += 1
            theta = y[:, : self.n_params].detach()
            return self._draw_reshuffle(float(t), y, theta, self.layout.unflatten(theta), theta.shape[0], v)
        c = self._draw(t, y)
        return c, (None if v is None else self._increments(c, v))

    def _draw(self, t: float, y: torch.Tensor) -> _Coefficients:
        """The drift of the θ part and the noise mini-batch at (t, y) (materialised: the noise rows too).

        Both engines draw the same data in the same order: the expected-gradient batches
        (``grad_source="batch"``), then the noise mini-batches.
        """
        self.n_evaluations += 1
        theta = y[:, : self.n_params].detach()
        params = self.layout.unflatten(theta)
        n = theta.shape[0]
        if self.data is None:  # a user's gradient_fn
            est = self.gradient_fn(params)
            return _Coefficients(t, y, self._drift(theta, est.grad), noise=self._noise_rows(n, est), params=params,
                                 grad=est.grad)
        noise_chunk, drift_chunk, data_chunk = self._chunk_sizes(theta)
        src = self.gradient_fn
        if self.sampling == "reshuffle":
            return self._draw_reshuffle(t, y, theta, params, n)
        grads = src.expected_gradient(params, traj_chunk=drift_chunk, data_chunk=data_chunk)
        c = _Coefficients(t, y, self._drift(theta, grads), batch=src.noise_batch(n, theta), params=params, grad=grads)
        if self.engine == "materialised":
            per = src.per_sample_gradients(params, c.batch, traj_chunk=noise_chunk)
            c.noise = self._noise_rows(n, GradientEstimate(grad=grads, per_sample=per))
        return c

    def _draw_reshuffle(self, t, y, theta, params, n, v: Optional[torch.Tensor] = None):
        """Reshuffled sampling: the full-set drift (and with v the increments) from one pass over the data."""
        src = self.gradient_fn
        X, Y = self.data.full(device=theta.device, dtype=theta.dtype)
        if self.engine == "materialised":
            grads = src.expected_gradient(params)
            c = _Coefficients(t, y, self._drift(theta, grads), params=params, grad=grads)
            self._dense_rows(c)
            return c if v is None else (c, self._g_prod_rows(c, v))
        _, drift_chunk, rows = self._chunk_sizes(theta)
        weights = None if v is None else self._reshuffle_weights(v, theta.dtype)
        grads, inc = self.reshuffle(params, src.consts(theta), X, Y, weights=weights, drift=True,
                                    traj_chunk=drift_chunk, rows=rows)
        c = _Coefficients(t, y, self._drift(theta, grads), params=params, grad=grads)
        return c if v is None else (c, self.layout.flatten(inc))

    def _reshuffle_weights(self, v: torch.Tensor, dtype) -> torch.Tensor:
        """c_i − c̄ with c_i = √η v_i/√(M(N − 1)): the increment √η G v = Σ_i (c_i − c̄) g_i, (n, N)."""
        w = v.to(dtype) * self._noise_scale()
        return w - w.mean(-1, keepdim=True)

    def _drift(self, theta: torch.Tensor, grads: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Def 4's drift −∇L(θ) − λ_wd θ of the θ part, (n, P)."""
        grad = self.layout.flatten(grads).to(theta.dtype)
        if grad.shape[0] != theta.shape[0]:
            grad = grad.expand(theta.shape[0], -1)
        return -grad if not self.weight_decay else -(grad + self.weight_decay * theta)

    def _noise_scale(self) -> float:
        """√η s/√(M(M−1)): the factor of (g_i − ḡ) in G's columns (s the drift-noise compensation).

        With reshuffled sampling √η/√(M(N − 1)), the columns running over all N samples.
        """
        M = self.M
        if self.sampling == "reshuffle":
            return self.noise_scale * (self.lr / (M * (len(self.data) - 1))) ** 0.5
        return self.noise_scale * (self.lr / (M * (M - 1))) ** 0.5

    def _noise_rows(self, n: int, est: GradientEstimate) -> list:
        """Per parameter, √η s (g_i − ḡ)/√(M(M−1)) as (n, M, numel): the columns of G (N columns reshuffled)."""
        M = self.noise_width
        scale = self._noise_scale()
        rows = []
        for spec in self.layout.specs:
            G = est.per_sample[spec.name]
            G = G.reshape(G.shape[0], G.shape[1], -1)  # (n or 1, M, numel)
            if G.shape[1] != M:
                raise ValueError(f"gradient_fn returned {G.shape[1]} per-sample gradients, expected {M}")
            E = G - G.mean(1, keepdim=True)
            rows.append(E.mul_(scale).expand(n, -1, -1))
        return rows

    def _block_weights(self, v: torch.Tensor, dtype) -> Dict[int, torch.Tensor]:
        """Per noise block b, the weights c_i − c̄ of the increment Σ_i (c_i − c̄) g_i, (n, M)."""
        M = self.M
        w = v.to(dtype).reshape(v.shape[0], -1, M) * self._noise_scale()
        w = w - w.mean(-1, keepdim=True)
        if self.noise_coupling == "shared":  # one Brownian block drives every noise block
            return {b: w[:, 0] for b in range(len(self.layout.blocks))}
        return {b: w[:, b] for b in range(w.shape[1])}

    def _increments(self, c: _Coefficients, v: torch.Tensor) -> torch.Tensor:
        """The θ part of G·v, (n, P)."""
        if c.noise is not None:
            return self._g_prod_rows(c, v)
        if self.sampling == "reshuffle":
            theta = c.y[:, : self.n_params].detach()
            X, Y = self.data.full(device=theta.device, dtype=theta.dtype)
            _, drift_chunk, rows = self._chunk_sizes(theta)
            _, inc = self.reshuffle(c.params, self.gradient_fn.consts(theta), X, Y,
                                    weights=self._reshuffle_weights(v, theta.dtype), drift=False,
                                    traj_chunk=drift_chunk, rows=rows)
            return self.layout.flatten(inc)
        return self._factored_pass(c, v, capture=False)[1]

    def _factored_pass(self, c: _Coefficients, v: Optional[torch.Tensor], capture: bool, on_chunk=None):
        """Run the factored noise pass over chunks of trajectories.

        Returns (the number of trajectories, the θ increments (n, P) or None); ``on_chunk``
        receives (slice, inputs, deltas) of every chunk when ``capture`` is set.
        """
        params, (X, Y) = c.params, c.batch
        ref = next(iter(params.values()))
        n = ref.shape[0]
        shared = self.gradient_fn.shared_noise_batch
        consts = self.gradient_fn.consts(ref)
        weights = None if v is None else self._block_weights(v, ref.dtype)
        chunk = self._chunk_sizes(ref)[0]
        inc = None if v is None else ref.new_empty(n, self.n_params)
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            p = {k: t[sl] for k, t in params.items()}
            xb, yb = (X, Y) if shared else (X[sl], Y[sl])
            w = None if weights is None else {b: t[sl] for b, t in weights.items()}
            xs, deltas, g = self.factored(p, consts, xb, yb, weights=w, capture=capture, shared_batch=shared)
            if inc is not None:
                inc[sl] = self.layout.flatten(g)
            if on_chunk is not None:
                on_chunk(sl, xs, deltas)
        return n, inc

    def _dense_rows(self, c: _Coefficients) -> list:
        """The noise rows of a factored evaluation, from per-sample gradients of its batch (tests)."""
        if c.noise is None:
            n = c.y.shape[0]
            batch = c.batch
            if self.sampling == "reshuffle":  # the columns of G run over the whole training set
                X, Y = self.data.full(device=c.y.device, dtype=c.y.dtype)
                batch = (X.expand(n, *X.shape), Y.expand(n, *Y.shape))
            per = self.gradient_fn.per_sample_gradients(c.params, batch, traj_chunk=self._chunk_sizes(c.y)[0])
            c.noise = self._noise_rows(n, GradientEstimate(grad={}, per_sample=per))
        return c.noise

    def f(self, t, y: torch.Tensor) -> torch.Tensor:
        """Drift: −∇L(θ) (− λ_wd θ) for the θ part (Def 4)."""
        return self._full_drift(self._coefficients(t, y)[0], y)

    def _full_drift(self, c: _Coefficients, y) -> torch.Tensor:
        extra = y.shape[1] - self.n_params
        if extra and c.drift.shape[1] != y.shape[1]:
            c.drift = torch.cat([c.drift, c.drift.new_zeros(c.drift.shape[0], extra)], 1)
        return c.drift

    def g_prod(self, t, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Diffusion times v: per block, √η s Ωᵀ v_block/√M, without the dense matrix."""
        c, inc = self._coefficients(t, y, v)
        return self._g_prod(c, y, v, inc)

    def f_and_g_prod(self, t, y: torch.Tensor, v: torch.Tensor):
        """(f, g·v) from one evaluation; this is what torchsde's Euler step calls."""
        c, inc = self._coefficients(t, y, v)
        return self._full_drift(c, y), self._g_prod(c, y, v, inc)

    def _g_prod(self, c: _Coefficients, y, v, inc):
        out = y.new_zeros(y.shape[0], y.shape[1])
        out[:, : self.n_params] = inc
        return out

    def _g_prod_rows(self, c: _Coefficients, v) -> torch.Tensor:
        out = c.noise[0].new_zeros(v.shape[0], self.n_params)
        for spec, E in zip(self.layout.specs, c.noise):
            vb = v[:, self.brownian_slice(spec.block)].to(E.dtype)
            out[:, spec.start : spec.stop] = torch.bmm(vb.unsqueeze(1), E).squeeze(1)
        return out

    # -- the dense diffusion (tests and small models) ------------------------------------
    @property
    def has_dense_diffusion(self) -> bool:
        """Whether :meth:`g` is offered (see ``dense_diffusion``)."""
        if self.dense_diffusion is not None:
            return bool(self.dense_diffusion)
        return self.state_size * self.brownian_size <= DENSE_DIFFUSION_MAX

    @property
    def g(self):
        """Dense diffusion matrix ``g(t, y)`` of shape (n, state_size, brownian_size).

        Block-diagonal √η s Ωᵀ/√M (and the log K rows of :class:`LipschitzSDE`); memory
        O(n·state_size·brownian_size) and per-sample gradients: for tests and small
        models only (``dense_diffusion``). Euler uses :meth:`f_and_g_prod`.
        """
        if not self.has_dense_diffusion:
            raise AttributeError(self._no_dense_message())
        return self._g

    def __getattr__(self, name):
        if name == "g":  # hasattr(sde, "g") is False at scale: sdeint then skips it
            raise AttributeError(self._no_dense_message())
        return super().__getattr__(name)

    def _no_dense_message(self) -> str:
        return (
            f"{type(self).__name__} offers no dense diffusion matrix g here: it would hold state_size × "
            f"brownian_size = {self.state_size} × {self.brownian_size} numbers per trajectory. Use g_prod / "
            "f_and_g_prod (what Euler calls), pass bm= to torchsde.sdeint so that it learns the noise size "
            "from the Brownian motion, or force it with dense_diffusion=True"
        )

    def _g(self, t, y: torch.Tensor) -> torch.Tensor:
        c, _ = self._coefficients(t, y)
        return self._g_dense(c, y)

    def _g_dense(self, c: _Coefficients, y):
        G = y.new_zeros(y.shape[0], y.shape[1], self.brownian_size)
        for spec, E in zip(self.layout.specs, self._dense_rows(c)):
            G[:, spec.start : spec.stop, self.brownian_slice(spec.block)] = E.mT
        return G

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, M={self.M}, params={self.n_params}, blocks={len(self.layout.blocks)}, "
            f"engine={self.engine!r}, sampling={self.sampling!r}, layers={self.layer_names}"
        )
