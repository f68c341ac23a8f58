"""The parameter SDE of Def 4 as a torchsde system, estimated live from a model and its data.

Def 4 (Eq. 3) models SGD with learning rate η, per layer ℓ, as the Itô SDE

    d vec θ^(ℓ) = −vec ∇^(ℓ)L(θ) dt + √η [Σ^(ℓ)]^{1/2} dB^(ℓ),

with block-diagonal gradient noise across layers (Assumption 3). :class:`ParameterSDE`
integrates it for a batch of trajectories with torchsde, estimating its coefficients
at every trajectory's own parameters at every evaluation:

- drift: −∇L(θ) (plus −λ_wd θ with weight decay), the *expected* gradient, on the whole
  training set when it is small or on an independent large batch, so that the drift
  does not carry mini-batch noise a second time (THEORY.md §5);
- diffusion: √η times the exact low-rank factor G = Ωᵀ/√M of Prop 5's Σ̂ = ΩᵀΩ/M from
  a fresh mini-batch of M samples, driven by an M-dimensional Brownian motion per
  layer (THEORY.md §2): GGᵀ = Σ̂, so the SDE has the law of Eq. 3 with Σ = Σ̂, and no
  decomposition (Prop 7) is needed. Column i of G is (g_i − ḡ)/√(M(M−1)).

Every module that owns trainable parameters is one noise block with its own
M-dimensional Brownian motion. A tracked layer's bias sits in the block of its weight:
the same per-sample rows drive weight and bias, which is their exact joint noise.

torchsde calls the drift and the diffusion separately at the same (t, y); both come
from one cached evaluation, so they share the mini-batch. Euler uses
:meth:`ParameterSDE.f_and_g_prod`, which never builds the dense
(batch, state, brownian) diffusion matrix; :meth:`ParameterSDE.g` does, for tests
and for torchsde's one-off shape check at the start of ``sdeint``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from .._checks import check_positive
from ..layers import TrackedLayer, tracked_layers
from ..spectral import DEFAULT_GAP_TOL
from ._functional import DataSource, GradientEstimate, ModelGradients, ParamLayout

__all__ = ["ParameterSDE"]


class _Coefficients:
    """One evaluation of the coefficients at (t, y) (cached; shared by f, g and g_prod)."""

    __slots__ = ("t", "y", "version", "drift", "noise", "log_drift", "lam", "terms")

    def __init__(self, t, y, drift, noise):
        self.t = t
        self.y = y
        self.version = y._version
        self.drift = drift  # (n, d)
        self.noise = noise  # per parameter (layout order), (n, M, numel): √η (g_i − ḡ)/√(M(M−1))
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
        ys = torchsde.sdeint(sde, sde.initial_state(64), ts, dt=0.05, method="euler")
        K = sde.lipschitz(ys)          # Π σ1(θ(t)), shape (len(ts), 64)

    Args:
        model: the network (its parameters give the initial state).
        loader: the training data: a ``DataLoader`` (its batch size is the default M),
            a map-style dataset of (x, y) pairs or a tuple (X, Y) of tensors. Not needed
            with ``gradient_fn``.
        lr: the learning rate η (noise scale √η; the natural solver step dt = η).
        loss_fn: ``loss_fn(output, target)`` returning the mean loss of a batch
            (default cross-entropy).
        noise_batch_size: M, samples per noise mini-batch (default: the loader's batch size).
        grad_source: where the expected gradient comes from: ``"full"``, ``"batch"`` or
            ``"auto"`` (full training set if it has at most ``full_max`` samples,
            otherwise an independent batch of ``grad_batch_size`` per evaluation).
        full_max: threshold of ``"auto"``.
        grad_batch_size: size of the independent expected-gradient batch.
        shared_noise_batch: draw one noise mini-batch per evaluation for all
            trajectories instead of one per trajectory.
        weight_decay: λ_wd of SGD's L2 penalty: the drift becomes −(∇L + λ_wd θ).
        seed: seed of the data sampling (:meth:`reseed` restarts it).
        layers: the tracked layers (default :func:`sdelip.tracked_layers`).
        example_input: passed to :func:`sdelip.tracked_layers` to order the layers.
        gradient_fn: replaces the model-and-data estimator: a callable
            ``gradient_fn(params) -> GradientEstimate`` with params {name: (n, *shape)};
            requires ``noise_batch_size``.
        traj_chunk: trajectories per vmapped gradient call (bounds memory).
        data_chunk: samples per vmapped call of the expected gradient.
        max_cached: largest dataset materialised in memory (see ``DataSource``).
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
        shared_noise_batch: bool = False,
        weight_decay: float = 0.0,
        seed: int = 0,
        layers: Optional[list] = None,
        example_input: Optional[torch.Tensor] = None,
        gradient_fn: Optional[Callable[[Dict[str, torch.Tensor]], GradientEstimate]] = None,
        traj_chunk: Optional[int] = None,
        data_chunk: int = 4096,
        max_cached: int = 50_000,
        gap_tol: float = DEFAULT_GAP_TOL,
        on_degenerate: str = "warn",
    ):
        super().__init__()
        if lr is None:
            raise TypeError("ParameterSDE needs the learning rate lr (η)")
        self.lr = check_positive(lr, "lr")
        self.noise_type = "general"
        self.sde_type = "ito"
        self.model = model
        self.layers: list[TrackedLayer] = list(layers) if layers is not None else tracked_layers(model, example_input)
        self.layout = ParamLayout(model, self.layers)
        self.weight_decay = float(weight_decay)
        self.gap_tol = float(gap_tol)
        self.on_degenerate = on_degenerate
        if gradient_fn is not None:
            if noise_batch_size is None:
                raise TypeError("gradient_fn needs noise_batch_size (M, the number of per-sample gradients)")
            self.data = None
            self.gradient_fn = gradient_fn
            self.M = int(noise_batch_size)
        else:
            if loader is None:
                raise TypeError("ParameterSDE needs training data (loader) or a gradient_fn")
            self.data = DataSource(loader, max_cached=max_cached, seed=seed)
            M = noise_batch_size if noise_batch_size is not None else self.data.batch_size
            if M is None:
                raise TypeError("pass noise_batch_size (M): the training data has no batch size")
            self.gradient_fn = ModelGradients(
                model, self.layout, self.data, loss_fn=loss_fn, noise_batch_size=M, grad_source=grad_source,
                full_max=full_max, grad_batch_size=grad_batch_size, shared_noise_batch=shared_noise_batch,
                traj_chunk=traj_chunk, data_chunk=data_chunk,
            )
            self.M = int(M)
        if self.M < 2:
            raise ValueError(f"the noise mini-batch needs M >= 2 samples (Prop 5 divides by M − 1), got {self.M}")
        self._cache: Optional[_Coefficients] = None
        self.n_evaluations = 0

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
    def brownian_size(self) -> int:
        """Brownian coordinates: one M-dimensional block per noise block (Assumption 3)."""
        return len(self.layout.blocks) * self.M

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

    def direct_lipschitz(self, ys: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """K = Π_ℓ σ1(θ^(ℓ)) computed from the simulated parameters (Def 10, Prop 8–9).

        Args:
            ys: states (..., state_size), e.g. sdeint's output (T, n, state_size).
            per_layer: return the per-layer σ1 as (..., L) instead of their product.
        """
        with torch.no_grad():
            s1 = torch.stack([torch.linalg.svdvals(W)[..., 0] for W in self.weight_matrices(ys)], -1)
        return s1 if per_layer else s1.prod(-1)

    def lipschitz(self, ys: torch.Tensor) -> torch.Tensor:
        """The Lipschitz bound K(t) of states ys; for the parameter SDE, :meth:`direct_lipschitz`."""
        return self.direct_lipschitz(ys)

    # -- coefficients --------------------------------------------------------------------
    def _coefficients(self, t, y: torch.Tensor) -> _Coefficients:
        c = self._cache
        tf = float(t)
        if c is not None and c.y is y and c.version == y._version and c.t == tf:
            return c
        c = self._evaluate(tf, y)
        self._cache = c
        return c

    def _estimate(self, y: torch.Tensor):
        n = y.shape[0]
        params = self.layout.unflatten(y[:, : self.n_params].detach())
        est = self.gradient_fn(params)
        self.n_evaluations += 1
        return n, params, est

    def _parameter_coefficients(self, y: torch.Tensor):
        """Def 4 at the states y: (n, params, estimate, drift −∇L(θ) − λ_wd θ, noise rows)."""
        n, params, est = self._estimate(y)
        theta = y[:, : self.n_params].detach()
        grad = self.layout.flatten(est.grad).to(theta.dtype)
        if grad.shape[0] != n:
            grad = grad.expand(n, -1)
        drift = -grad if not self.weight_decay else -(grad + self.weight_decay * theta)
        return n, params, est, drift, self._noise_rows(n, est)

    def _evaluate(self, t: float, y: torch.Tensor) -> _Coefficients:
        n, _, _, drift, noise = self._parameter_coefficients(y)
        extra = y.shape[1] - self.n_params
        if extra:
            drift = torch.cat([drift, drift.new_zeros(n, extra)], 1)
        return _Coefficients(t, y, drift, noise)

    def _noise_rows(self, n: int, est: GradientEstimate) -> list:
        """Per parameter, √η (g_i − ḡ)/√(M(M−1)) as (n, M, numel): the columns of G = √η Ωᵀ/√M."""
        M = self.M
        scale = (self.lr / (M * (M - 1))) ** 0.5
        rows = []
        for spec in self.layout.specs:
            G = est.per_sample[spec.name]
            G = G.reshape(G.shape[0], G.shape[1], -1)  # (n or 1, M, numel)
            if G.shape[1] != M:
                raise ValueError(f"gradient_fn returned {G.shape[1]} per-sample gradients, expected M = {M}")
            E = G - G.mean(1, keepdim=True)
            rows.append(E.mul_(scale).expand(n, -1, -1))
        return rows

    def f(self, t, y: torch.Tensor) -> torch.Tensor:
        """Drift: −∇L(θ) (− λ_wd θ) for the θ part (Def 4)."""
        return self._coefficients(t, y).drift

    def g_prod(self, t, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Diffusion times v: per block, √η Ωᵀ v_block/√M, without the dense matrix."""
        c = self._coefficients(t, y)
        return self._g_prod(c, y, v)

    def f_and_g_prod(self, t, y: torch.Tensor, v: torch.Tensor):
        """(f, g·v) from one evaluation; this is what torchsde's Euler step calls."""
        c = self._coefficients(t, y)
        return c.drift, self._g_prod(c, y, v)

    def _g_prod(self, c: _Coefficients, y, v):
        M = self.M
        out = y.new_zeros(y.shape[0], y.shape[1])
        for spec, E in zip(self.layout.specs, c.noise):
            b = spec.block
            vb = v[:, b * M : (b + 1) * M].to(E.dtype)
            out[:, spec.start : spec.stop] = torch.bmm(vb.unsqueeze(1), E).squeeze(1)
        return out

    def g(self, t, y: torch.Tensor) -> torch.Tensor:
        """Dense diffusion matrix (n, state_size, brownian_size): block-diagonal Ωᵀ/√M·√η.

        Memory O(n·state_size·brownian_size): for tests and small models only; Euler
        uses :meth:`f_and_g_prod`.
        """
        c = self._coefficients(t, y)
        return self._g_dense(c, y)

    def _g_dense(self, c: _Coefficients, y):
        M = self.M
        G = y.new_zeros(y.shape[0], y.shape[1], self.brownian_size)
        for spec, E in zip(self.layout.specs, c.noise):
            b = spec.block
            G[:, spec.start : spec.stop, b * M : (b + 1) * M] = E.mT
        return G

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, M={self.M}, params={self.n_params}, blocks={len(self.layout.blocks)}, "
            f"layers={self.layer_names}"
        )
