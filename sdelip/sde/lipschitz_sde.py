"""The coupled system of Def 10: parameters and per-layer log-Lipschitz constants.

Def 10 couples Def 4's parameter SDE with K^(ℓ) = ‖θ^(ℓ)‖_op = σ1(θ^(ℓ)) (Prop 9),
Z = Σ_ℓ log K^(ℓ) and K = e^Z (Prop 8). Itô's lemma (Thm 14, then the log of Thm 15)
gives, per layer, driven by the *same* Brownian motion B^(ℓ) as the layer's parameters,

    d log K^(ℓ) = (μ^(ℓ) + κ^(ℓ) − ½‖λ^(ℓ)‖²) dt + λ^(ℓ)ᵀ dB^(ℓ),

with μ = −u1ᵀ∇L v1/σ1, κ = (η/2σ1)⟨H, Σ⟩ and λ = (√η/σ1) Gᵀ J for the factor G = Ωᵀ/√M
that drives the parameters (docs/theory.md §3, §6): coordinate i of λ is
(√η/σ1)(u1ᵀ E_i v1)/√(M(M−1)), E_i = g_i − ḡ.

:class:`LipschitzSDE` integrates both in one state [θ, log K^(1), …, log K^(L)], so
one ``torchsde.sdeint`` call returns the Itô-integrated K(t) = exp Σ log K^(ℓ)
(:meth:`LipschitzSDE.lipschitz`) and the directly computed Π σ1(θ(t))
(:meth:`LipschitzSDE.direct_lipschitz`). Their agreement, improving as dt → 0, is the
pathwise test of the Itô calculus; dropping κ or the −½‖λ‖² correction breaks it.

The log K rows are a component, :class:`LogLipschitzRows` (an
:class:`~sdelip.sde.evaluation.ExtraRows`), composed with the parameter system:
:class:`LipschitzSDE` is :class:`~sdelip.sde.ParameterSDE` with these rows. At each
evaluation they decompose every layer's weight matrices over the trajectories
(:func:`sdelip.core.decompositions.decompose_batched`, the decomposition interface of the
tracker), observe the parameters' noise pass for the projections g_i v1 and g_iᵀ u1
(the layer rules' ``trajectory_projections``, or the materialised rows), and turn them
into Thm 14's terms.

:meth:`LipschitzSDE.from_record` builds the reduced Z-system of a tracking record
(:class:`sdelip.sde.ReducedLipschitzSDE`).
"""

from __future__ import annotations

import inspect
from typing import Dict, Optional

import attrs
import torch

from .._checks import check_gap, check_lipschitz_sde_options, check_lipschitz_sde_sampling
from ..core.decompositions import BatchedDecomposition, decompose_batched
from ..core.formulas import terms_from_projections
from ..engines.base import DEFAULT_CHUNK_BYTES
from ..core.catalogue import INTEGRABLE_TERMS, SDE_TERMS
from .evaluation import Evaluation, ExtraRows, NoiseObserver
from .._deprecation import take_deprecated
from ..rules.inventory import tracked_layers
from .options import (DEPRECATED_LIPSCHITZ_SDE_KEYWORDS, SPELLED, ComputeOptions, DriftOptions, LogKOptions,
                      NoiseOptions, evolve)
from .parameter_sde import ParameterSDE

__all__ = ["LipschitzSDE", "LogLipschitzRows"]

#: The names of the per-layer terms returned by :meth:`LipschitzSDE.terms` (:data:`sdelip.core.catalogue.TERMS`).
TERM_NAMES = SDE_TERMS
#: Terms whose integrals ``integrate=`` can carry in the state.
INTEGRABLE = INTEGRABLE_TERMS
#: Smallest min(m, n) for which the per-trajectory Gram route beats a batched SVD on CPU
#: (the timings are in docs/performance.md, "Timings behind the code's defaults").
FAST_MIN_DIM = 64


@attrs.frozen
class LogLipschitzCoefficients:
    """The log K rows' coefficients at one evaluation (n trajectories, L layers).

    Attributes:
        drift: (n, L·(1 + integrated)) the log K drifts μ + κ − ½‖λ‖² (per the switches),
            then the integrated terms.
        lam: (n, L, M) the diffusion rows λ^(ℓ) on each layer's Brownian block (Thm 14).
        terms: {name: (n, L)} Thm 14's σ1, μ, κ, ‖λ‖² (and the step curvature when asked).
    """

    drift: torch.Tensor
    lam: torch.Tensor
    terms: Dict[str, torch.Tensor]


class _Projections(NoiseObserver):
    """g_i v1 and g_iᵀ u1 of every layer on the noise mini-batch, filled from the noise pass."""

    def __init__(self, sde, ev: Evaluation, Ws: list, decs: list):
        y = ev.y
        n, M = y.shape[0], sde.M
        self.sde, self.Ws, self.decs = sde, Ws, decs
        self.Gv = [y.new_empty(n, M, layer.shape[0]) for layer in sde.layers]
        self.Gtu = [y.new_empty(n, M, W.shape[-1]) for layer, W in zip(sde.layers, Ws)]

    def rows(self, rows: list) -> None:
        """Materialised: from the per-sample rows (centred and scaled; the terms are centred)."""
        sde = self.sde
        named = dict(zip((s.name for s in sde.layout.specs), rows))
        scale = sde.column_scale()
        n, M = self.Gv[0].shape[:2]
        for i, (wname, d) in enumerate(zip(sde.layout.weight_names, self.decs)):
            E = named[wname].reshape(n, M, *self.Ws[i].shape[1:]) / scale
            self.Gv[i] = (E @ d.v1[:, None, :, None]).squeeze(-1)
            self.Gtu[i] = (d.u1[:, None, None, :] @ E).squeeze(-2)

    def chunk(self, sl: slice, inputs: dict, deltas: dict) -> None:
        """Factored: by each layer's rule, from its inputs x (c, M, …) and per-sample output gradients δ."""
        for i, (layer, d) in enumerate(zip(self.sde.layers, self.decs)):
            self.Gv[i][sl], self.Gtu[i][sl] = layer.rule.trajectory_projections(
                layer.module, layer.attr, inputs[layer.name], deltas[layer.name], d.u1[sl], d.v1[sl],
                DEFAULT_CHUNK_BYTES)


class LogLipschitzRows(ExtraRows):
    """Def 10's rows log K^(1), …, log K^(L) (then the integrated terms) of a parameter system.

    Per layer, Thm 14's drift μ + κ − ½‖λ‖² and the diffusion row λ^(ℓ)ᵀ on the Brownian
    block of layer ℓ, so that the same increments drive θ^(ℓ) and log K^(ℓ). Built by
    :class:`LipschitzSDE`; the arguments are its options.

    Args:
        layer_blocks: the noise block of each tracked layer (``layout.layer_blocks``).
        include_drift, include_noise_curvature, include_ito_correction, include_diffusion,
        include_step_curvature, integrate, decomposition: see :class:`LipschitzSDE`.
    """

    def __init__(self, layer_blocks, *, include_drift: bool = True, include_noise_curvature: bool = True,
                 include_ito_correction: bool = True, include_diffusion: bool = True,
                 include_step_curvature: bool = False, integrate: tuple = (), decomposition: str = "auto"):
        self.layer_blocks = list(layer_blocks)
        self.n_layers = len(self.layer_blocks)
        self.include_step_curvature = bool(include_step_curvature)
        self.integrate = integrate
        self.include_drift = bool(include_drift)
        self.include_noise_curvature = bool(include_noise_curvature)
        self.include_ito_correction = bool(include_ito_correction)
        self.include_diffusion = bool(include_diffusion)
        self.decomposition = decomposition
        self.width = self.n_layers * (1 + len(integrate))
        self._gap_warned: set = set()

    def initial_state(self, sde, theta: torch.Tensor) -> torch.Tensor:
        """[log σ1(θ^(1)(0)), …, 0 for the integrated terms], (1, width)."""
        logk = sde.direct_lipschitz(theta, per_layer=True).log()
        return torch.cat([logk, logk.new_zeros(1, self.n_layers * len(self.integrate))], 1)

    def route(self, shape, device) -> str:
        """The decomposition route of a layer: ``"fast"`` for CPU layers of at least
        :data:`FAST_MIN_DIM` rows and columns (one Gram eigensolve per trajectory), else a
        batched SVD over the trajectories."""
        if self.decomposition != "auto":
            return self.decomposition
        return "fast" if torch.device(device).type == "cpu" and min(shape) >= FAST_MIN_DIM else "svd"

    def decompose(self, sde, y: torch.Tensor) -> tuple:
        """(the weight matrices, their :class:`~sdelip.core.decompositions.BatchedDecomposition`) per layer at the states y."""
        Ws = sde.weight_matrices(y[:, : sde.n_params].detach())
        return Ws, [decompose_batched(W, self.route(W.shape[1:], y.device), sde.gap_tol) for W in Ws]

    def observer(self, sde, ev: Evaluation) -> _Projections:
        """Decompose the layers (Assumption 11 checked on the smallest gap), then collect the projections."""
        Ws, decs = self.decompose(sde, ev.y)
        for layer, d in zip(sde.layers, decs):
            self._check_gap(sde, float(d.sigma1.min()), float(d.gap.min()), layer.name, ev.t)
        return _Projections(sde, ev, Ws, decs)

    def evaluate(self, sde, ev: Evaluation, observer: _Projections) -> LogLipschitzCoefficients:
        """Thm 14's terms per layer and trajectory, the log K drifts and the rows λ^(ℓ)."""
        y = ev.y
        n = y.shape[0]
        log_drift, lam, terms = [], [], {k: [] for k in TERM_NAMES}
        lam_scale = sde.column_scale()
        Gv, Gtu = observer.Gv, observer.Gtu
        for i, (wname, d) in enumerate(zip(sde.layout.weight_names, observer.decs)):
            m, k = observer.Ws[i].shape[1:]
            gW = ev.grad[wname].to(y.dtype).reshape(-1, m, k).expand(n, m, k)
            grad_proj = torch.einsum("na,nab,nb->n", d.u1, gW, d.v1)
            t = terms_from_projections(d, Gv[i], Gtu[i], sde.lr, grad_proj=grad_proj, weight_decay=sde.weight_decay)
            mu, kappa, lam2 = t.drift, t.noise_curvature, t.diffusion_sq
            if self.include_step_curvature or "step_curvature" in self.integrate:
                sc = self._step_curvature(sde, d, gW, kappa)
                terms.setdefault("step_curvature", []).append(sc)
            proj = ((Gv[i] - Gv[i].mean(1, keepdim=True)) * d.u1.unsqueeze(1)).sum(-1)  # u1ᵀ E_i v1, (n, M)
            lam_row = proj * (lam_scale / d.sigma1).unsqueeze(1)
            a = torch.zeros_like(mu)
            if self.include_drift:
                a = a + mu
            if self.include_noise_curvature:
                a = a + kappa
            if self.include_ito_correction:
                a = a - 0.5 * lam2
            if self.include_step_curvature:
                a = a + sc
            log_drift.append(a)
            lam.append(lam_row if self.include_diffusion else torch.zeros_like(lam_row))
            for name, val in zip(TERM_NAMES, (d.sigma1, mu, kappa, lam2)):
                terms[name].append(val)
        terms = {k: torch.stack(val, 1) for k, val in terms.items()}
        integrals = [terms[k].to(y.dtype) for k in self.integrate]
        drift = torch.cat([torch.stack(log_drift, 1).to(y.dtype), *integrals], 1)
        return LogLipschitzCoefficients(drift=drift, lam=torch.stack(lam, 1).to(y.dtype), terms=terms)  # lam (n, L, M)

    def _step_curvature(self, sde, d: BatchedDecomposition, gW: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
        """(η/2σ1) ∇Lᵀ H ∇L per trajectory: the O(η) drift of log K that a discrete step of length η adds.

        With a batch drift ĝ of B samples, E[ĝᵀHĝ] = ∇LᵀH∇L + tr(H Var[g])/B, and
        (η/2σ1) tr(H Var[g])/B = κ·M/B: subtracted, the estimate is unbiased.
        """
        gv = (gW @ d.v1.unsqueeze(-1)).squeeze(-1)
        gtu = (d.u1.unsqueeze(1) @ gW).squeeze(1)
        sc = sde.lr / (2 * d.sigma1) * d.hessian_quadform(gv, gtu)
        src = sde.gradient_fn
        if sde.data is not None and src.grad_source == "batch":
            sc = sc - kappa * (sde.M / src.grad_batch_size)
        return sc

    def _check_gap(self, sde, sigma1: float, gap: float, name: str, t: float) -> None:
        # Assumption 11 over all trajectories; a degenerate layer warns once per system.
        policy = sde.on_degenerate
        if policy == "warn" and name in self._gap_warned:
            policy = "ignore"
        if check_gap(sigma1, gap, sde.gap_tol, policy, name=f"{name} (t = {t:g}, smallest gap over trajectories)"):
            self._gap_warned.add(name)

    def g_prod(self, sde, coefficients: LogLipschitzCoefficients, v: torch.Tensor, out: torch.Tensor) -> None:
        """λ^(ℓ)ᵀ v_block(ℓ) into the log K columns of ``out``; the integrated columns have no diffusion."""
        for i, b in enumerate(self.layer_blocks):
            vb = v[:, sde.brownian_slice(b)].to(coefficients.lam.dtype)
            out[:, i] = (coefficients.lam[:, i] * vb).sum(-1)

    def dense(self, sde, coefficients: LogLipschitzCoefficients, G: torch.Tensor) -> None:
        """λ^(ℓ) on layer ℓ's Brownian block of the log K rows of ``G``."""
        for i, b in enumerate(self.layer_blocks):
            G[:, i, sde.brownian_slice(b)] = coefficients.lam[:, i]


class LipschitzSDE(ParameterSDE):
    """Def 10 as one torchsde system: state [θ, log K^(1), …, log K^(L)] per trajectory.

    Everything about the θ part (drift, noise, data, options) is as in
    :class:`ParameterSDE`. The log K^(ℓ) rows add Thm 14's drift μ + κ − ½‖λ‖² and the
    diffusion row λ^(ℓ)ᵀ on the Brownian block of layer ℓ, so the same increments drive
    θ^(ℓ) and log K^(ℓ).

    Example::

        sde = LipschitzSDE(model, loader, lr=0.05)
        ts = sdelip.sde.time_grid(t1=2.0, dt=0.05)
        bm = sde.brownian_motion(64, dt=0.05)
        ys = torchsde.sdeint(sde, sde.initial_state(64), ts, bm=bm, dt=0.05, method="euler")
        K_ito = sde.lipschitz(ys)            # exp Σ log K^(ℓ), Thm 14–16
        K_direct = sde.direct_lipschitz(ys)  # Π σ1(θ(t)), Def 10

    Args:
        model, loader, lr: as in :class:`ParameterSDE` (all its keyword options apply).
        log_k: a :class:`~sdelip.sde.options.LogKOptions`, the log K rows' options:
            ``include_drift``, ``include_noise_curvature``, ``include_ito_correction``,
            ``include_diffusion`` keep μ, κ, −½‖λ‖² and the diffusion row λᵀ dB;
            ``include_step_curvature`` adds (η/2σ1) ∇Lᵀ H ∇L to the log K drift: the O(η)
            drift of a discrete SGD step that the SDE drops (docs/theory.md §6; the tracker's
            ``step_curvature``). Euler with dt = η moves θ by discrete steps, so Π σ1(θ)
            contains this drift; with the switch the Itô-integrated log K does too
            (at dt = η; for dt → 0 it overshoots by ∫ step_curvature). Off by default:
            Def 10 has no such term. Reported by :meth:`terms` as ``step_curvature``.
            ``integrate``: names of terms (among ``"drift"``, ``"noise_curvature"``,
            ``"diffusion_sq"``, ``"step_curvature"``) whose time integral ∫ term^(ℓ) dt per
            layer is carried as extra state columns (no diffusion); read them with
            :meth:`integrated`. E.g. ``LogKOptions(include_step_curvature=True,
            integrate=("step_curvature",))`` gives log K with and without it from one run.
            ``decomposition``: ``"auto"`` (the tracker's Gram route for CPU layers of at
            least :data:`FAST_MIN_DIM` rows and columns, a batched SVD otherwise and on
            CUDA), ``"fast"`` or ``"svd"``. ``gap_tol``, ``on_degenerate``: Assumption 11's
            tolerance and policy for a degenerate σ1.
        **kwargs: keyword options of :class:`ParameterSDE`. The flat keywords of earlier
            releases (``include_*``, ``integrate``, ``decomposition``, ``gap_tol``,
            ``on_degenerate`` and those of :class:`ParameterSDE`) still work for this
            release with a DeprecationWarning naming their replacement.

    The log K rows are :attr:`extra_rows`, a :class:`LogLipschitzRows`; their options are
    its attributes (``sde.extra_rows.integrate``, …, also readable on the system).

    The ``include_*`` switches exist to measure what each term is worth; with any of
    them off (or the step curvature on) the log K state no longer follows the
    parameters' SDE exactly.
    """

    def __init__(self, model, loader=None, lr: float = None, *, log_k: Optional[LogKOptions] = None, **kwargs):
        params = set(inspect.signature(ParameterSDE.__init__).parameters)
        old = {k: kwargs.pop(k) for k in list(kwargs) if k not in params}
        moved = take_deprecated("LipschitzSDE", old, DEPRECATED_LIPSCHITZ_SDE_KEYWORDS, SPELLED)
        for group, cls in (("drift", DriftOptions), ("noise", NoiseOptions), ("compute", ComputeOptions)):
            if group in moved:
                kwargs[group] = evolve(kwargs.get(group), cls, moved[group])
        if "layers" in moved and kwargs.get("layers") is None:
            kwargs["layers"] = tracked_layers(model, moved["layers"]["example_input"])
        log_k = evolve(log_k, LogKOptions, moved.get("log_k", {}))
        self.log_k_options = log_k
        check_lipschitz_sde_sampling(kwargs.get("sampling", "iid"))
        super().__init__(model, loader, lr, **kwargs)
        self.gap_tol, self.on_degenerate = log_k.gap_tol, log_k.on_degenerate
        integrate = check_lipschitz_sde_options(log_k.integrate, INTEGRABLE, log_k.decomposition)
        self.extra_rows = LogLipschitzRows(
            self.layout.layer_blocks, include_drift=log_k.include_drift,
            include_noise_curvature=log_k.include_noise_curvature,
            include_ito_correction=log_k.include_ito_correction, include_diffusion=log_k.include_diffusion,
            include_step_curvature=log_k.include_step_curvature, integrate=integrate,
            decomposition=log_k.decomposition,
        )

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def integrate(self) -> tuple:
        """The terms whose integrals the state carries (``LogKOptions.integrate``)."""
        return self.extra_rows.integrate

    @property
    def decomposition(self) -> str:
        """The decomposition route option (``LogKOptions.decomposition``; :meth:`LogLipschitzRows.route`)."""
        return self.extra_rows.decomposition

    def integrated(self, ys: torch.Tensor, name: str, per_layer: bool = True) -> torch.Tensor:
        """∫_0^t term^(ℓ) ds of a term named in ``integrate``: (..., L), or the sum over layers."""
        if name not in self.integrate:
            raise KeyError(f"{name!r} is not integrated; pass log_k=LogKOptions(integrate=({name!r},)) (integrated: "
                           f"{self.integrate})")
        start = self.n_params + self.n_layers * (1 + self.integrate.index(name))
        z = ys[..., start : start + self.n_layers]
        return z if per_layer else z.sum(-1)

    def log_lipschitz(self, ys: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """The Itô-integrated log K^(ℓ) (..., L), or Z = Σ_ℓ c_ℓ log K^(ℓ) (...) (c_ℓ: uses of a tied weight)."""
        z = ys[..., self.n_params : self.n_params + self.n_layers]
        return z if per_layer else (z * self.uses.to(z)).sum(-1)

    def lipschitz(self, ys: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """K(t) = exp Z(t) from the Itô-integrated state (Thm 16); per layer K^(ℓ) if asked."""
        return self.log_lipschitz(ys, per_layer).exp()

    def terms(self, t, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Thm 14's per-layer terms at the states y: {name: (n, L)} for σ1, μ, κ, ‖λ‖²."""
        return dict(self.evaluate(t, y)[0].extra.terms)

    @classmethod
    def from_record(cls, record, **kwargs):
        """The reduced Z-system of a tracking record: see :meth:`ReducedLipschitzSDE.from_record`."""
        from .reduced import ReducedLipschitzSDE

        return ReducedLipschitzSDE.from_record(record, **kwargs)
