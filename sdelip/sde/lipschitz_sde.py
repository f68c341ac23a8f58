"""The coupled system of Def 10: parameters and per-layer log-Lipschitz constants.

Def 10 couples Def 4's parameter SDE with K^(ℓ) = ‖θ^(ℓ)‖_op = σ1(θ^(ℓ)) (Prop 9),
Z = Σ_ℓ log K^(ℓ) and K = e^Z (Prop 8). Itô's lemma (Thm 14, then the log of Thm 15)
gives, per layer, driven by the *same* Brownian motion B^(ℓ) as the layer's parameters,

    d log K^(ℓ) = (μ^(ℓ) + κ^(ℓ) − ½‖λ^(ℓ)‖²) dt + λ^(ℓ)ᵀ dB^(ℓ),

with μ = −u1ᵀ∇L v1/σ1, κ = (η/2σ1)⟨H, Σ⟩ and λ = (√η/σ1) Gᵀ J for the factor G = Ωᵀ/√M
that drives the parameters (THEORY.md §2, §4): coordinate i of λ is
(√η/σ1)(u1ᵀ E_i v1)/√(M(M−1)), E_i = g_i − ḡ.

:class:`LipschitzSDE` integrates both in one state [θ, log K^(1), …, log K^(L)], so
one ``torchsde.sdeint`` call returns the Itô-integrated K(t) = exp Σ log K^(ℓ)
(:meth:`LipschitzSDE.lipschitz`) and the directly computed Π σ1(θ(t))
(:meth:`LipschitzSDE.direct_lipschitz`). Their agreement, improving as dt → 0, is the
pathwise test of the Itô calculus; dropping κ or the −½‖λ‖² correction breaks it.

:meth:`LipschitzSDE.from_record` builds the reduced Z-system of a tracking record
(:class:`sdelip.sde.ReducedLipschitzSDE`).
"""

from __future__ import annotations

from typing import Dict, Optional

import attrs
import torch
from torch.func import vmap

from .._checks import check_gap
from ..curvature import decompose_layer
from ..engines.base import DEFAULT_CHUNK_BYTES
from ..spectral import SpectralDecomposition
from ..terms import INTEGRABLE_TERMS, SDE_TERMS
from .parameter_sde import ParameterSDE, _Coefficients

__all__ = ["LipschitzSDE"]

#: The names of the per-layer terms returned by :meth:`LipschitzSDE.terms` (:data:`sdelip.terms.TERMS`).
TERM_NAMES = SDE_TERMS
#: Terms whose integrals ``integrate=`` can carry in the state.
INTEGRABLE = INTEGRABLE_TERMS
#: Smallest min(m, n) for which the per-trajectory Gram route beats a batched SVD on CPU
#: (measured on the development machine, one thread: 2.1 vs 2.6 ms at 64 × 288, 59 vs
#: 219 ms at 512 × 784; 1.5 vs 1.0 ms at 32 × 64).
FAST_MIN_DIM = 64


@attrs.frozen
class _Decomposition:
    """The top singular pairs of one layer's weight matrices over the trajectories.

    Attributes:
        s1: (n,) σ1; u1: (n, m); v1: (n, k); gap: (n,) relative gaps.
        svd: (U, S, V) batched thin SVD (route ``"svd"``), or None.
        curvature: per trajectory a :class:`GramCurvature` or, for a degenerate spectrum,
            a :class:`SpectralDecomposition` (route ``"fast"``), or None.
    """

    s1: torch.Tensor
    u1: torch.Tensor
    v1: torch.Tensor
    gap: torch.Tensor
    svd: Optional[tuple] = None
    curvature: Optional[list] = None


def _decompose_batched(W: torch.Tensor, route: str, gap_tol: float) -> _Decomposition:
    """Decompose the weight matrices W (n, m, k) by the ``"svd"`` or ``"fast"`` route."""
    if route == "svd":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        V = Vh.mT
        gap = (S[..., 0] - S[..., 1]) / S[..., 0] if S.shape[-1] > 1 else torch.ones_like(S[..., 0])
        return _Decomposition(S[..., 0], U[..., 0], V[..., 0], gap, svd=(U, S, V))
    curv = [decompose_layer(Wj, "fast", gap_tol, on_degenerate="ignore") for Wj in W.detach()]
    stack = lambda f: torch.stack([f(c) for c in curv])  # noqa: E731
    return _Decomposition(
        stack(lambda c: c.sigma1),
        stack(lambda c: c.u1), stack(lambda c: c.v1), stack(lambda c: torch.as_tensor(c.gap, dtype=W.dtype)),
        curvature=curv,
    )


def _layer_terms_batched(dec: _Decomposition, Gv, Gtu, grad_proj, lr, weight_decay, gap_tol):
    """Thm 14's (μ, κ, ‖λ‖²) of one layer for a batch of trajectories, each (n,).

    Gv (n, M, m) and Gtu (n, M, k) are the projections g_i v1 and g_iᵀ u1 of the noise
    mini-batch; grad_proj (n,) is u1ᵀ ∇L v1 of the expected gradient. κ and ‖λ‖² come from
    :func:`sdelip.dynamics.terms_from_projections` (SVD route) or the tracker's
    :func:`sdelip.curvature.fast_layer_terms` (Gram route), which agree.
    """
    mu = -grad_proj / dec.s1 - weight_decay
    if dec.svd is not None:
        def one(U, S, V, Gv, Gtu):
            t = SpectralDecomposition(U=U, S=S, V=V, gap_tol=gap_tol).terms(Gv, Gtu, lr)
            return t.noise_curvature, t.diffusion_sq

        kappa, lam2 = vmap(one)(*dec.svd, Gv, Gtu)
        return mu, kappa, lam2
    out = []
    for c, gv, gtu in zip(dec.curvature, Gv, Gtu):
        t = c.terms(gv, gtu, lr)
        out.append(torch.stack([t.noise_curvature, t.diffusion_sq]))
    kappa, lam2 = torch.stack(out).unbind(1)
    return mu, kappa, lam2


def _gradient_quadform_batched(dec: _Decomposition, gv: torch.Tensor, gtu: torch.Tensor) -> torch.Tensor:
    """∇Lᵀ H ∇L per trajectory (n,), from gv = ∇L v1 (n, m) and gtu = ∇Lᵀ u1 (n, k) (Lemma 13)."""
    if dec.svd is not None:
        def one(U, S, V, a, b):
            return SpectralDecomposition(U=U, S=S, V=V).hessian_quadform(a, b)

        return vmap(one)(*dec.svd, gv, gtu)
    return torch.stack([c.hessian_quadform(a, b) for c, a, b in zip(dec.curvature, gv, gtu)])


def _layer_projections(layer, x: torch.Tensor, delta: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor):
    """g_i v1 and g_iᵀ u1 of a chunk of trajectories, (c, M, m) and (c, M, k), by the layer's rule.

    x (c, M, …) are the layer's inputs and δ (c, M, …) its per-sample output gradients.
    """
    return layer.rule.trajectory_projections(layer.module, layer.attr, x, delta, u1, v1, DEFAULT_CHUNK_BYTES)


class LipschitzSDE(ParameterSDE):
    """Def 10 as one torchsde system: state [θ, log K^(1), …, log K^(L)] per trajectory.

    Everything about the θ part (drift, noise, data, options) is as in
    :class:`ParameterSDE`. The log K^(ℓ) rows add Thm 14's drift μ + κ − ½‖λ‖² and the
    diffusion row λ^(ℓ)ᵀ on the Brownian block of layer ℓ, so the same increments drive
    θ^(ℓ) and log K^(ℓ).

    Example::

        sde = LipschitzSDE(model, loader, lr=0.05)
        ts = sdelip.sde.time_grid(t1=2.0, dt=0.05)
        ys = torchsde.sdeint(sde, sde.initial_state(64), ts, dt=0.05, method="euler")
        K_ito = sde.lipschitz(ys)            # exp Σ log K^(ℓ), Thm 14–16
        K_direct = sde.direct_lipschitz(ys)  # Π σ1(θ(t)), Def 10

    Args:
        model, loader, lr: as in :class:`ParameterSDE` (all its keyword options apply).
        include_drift: keep μ in the log K drift.
        include_noise_curvature: keep κ (Thm 14's noise-curvature entropy production).
        include_ito_correction: keep −½‖λ‖² (the Itô correction of log, Thm 15).
        include_diffusion: keep the diffusion row λᵀ dB.
        include_step_curvature: add (η/2σ1) ∇Lᵀ H ∇L to the log K drift: the O(η) drift of
            a discrete SGD step that the SDE drops (THEORY.md §4; the tracker's
            ``step_curvature``). Euler with dt = η moves θ by discrete steps, so Π σ1(θ)
            contains this drift; with the switch the Itô-integrated log K does too
            (at dt = η; for dt → 0 it overshoots by ∫ step_curvature). Off by default:
            Def 10 has no such term. Reported by :meth:`terms` as ``step_curvature``.
        integrate: names of terms (among ``"drift"``, ``"noise_curvature"``,
            ``"diffusion_sq"``, ``"step_curvature"``) whose time integral ∫ term^(ℓ) dt per
            layer is carried as extra state columns (no diffusion); read them with
            :meth:`integrated`. E.g. ``integrate=("step_curvature",)`` with the step
            curvature on gives log K with and without it from one run.
        decomposition: ``"auto"`` (the tracker's Gram route for CPU layers of at least
            :data:`FAST_MIN_DIM` rows and columns, a batched SVD otherwise and on CUDA),
            ``"fast"`` or ``"svd"``.
        **kwargs: keyword options of :class:`ParameterSDE`.

    The ``include_*`` switches exist to measure what each term is worth; with any of
    them off (or the step curvature on) the log K state no longer follows the
    parameters' SDE exactly.
    """

    def __init__(
        self,
        model,
        loader=None,
        lr: float = None,
        *,
        include_drift: bool = True,
        include_noise_curvature: bool = True,
        include_ito_correction: bool = True,
        include_diffusion: bool = True,
        include_step_curvature: bool = False,
        integrate: tuple = (),
        decomposition: str = "auto",
        **kwargs,
    ):
        if kwargs.get("sampling", "iid") == "reshuffle":
            raise NotImplementedError(
                "LipschitzSDE with sampling='reshuffle' would need the log K rows over all N samples; simulate "
                "ParameterSDE(..., sampling='reshuffle') and read K = Π σ1(θ) with direct_lipschitz, or the reduced "
                "system ReducedLipschitzSDE(..., steps_per_epoch=, batch_fraction=)"
            )
        super().__init__(model, loader, lr, **kwargs)
        self.include_step_curvature = bool(include_step_curvature)
        integrate = (integrate,) if isinstance(integrate, str) else tuple(integrate)
        bad = [k for k in integrate if k not in INTEGRABLE]
        if bad:
            raise ValueError(f"integrate takes term names among {INTEGRABLE}, got {bad}")
        self.integrate = integrate
        self.include_drift = bool(include_drift)
        self.include_noise_curvature = bool(include_noise_curvature)
        self.include_ito_correction = bool(include_ito_correction)
        self.include_diffusion = bool(include_diffusion)
        if decomposition not in ("auto", "fast", "svd"):
            raise ValueError(f"decomposition must be 'auto', 'fast' or 'svd', got {decomposition!r}")
        self.decomposition = decomposition

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def state_size(self) -> int:
        return self.n_params + self.n_layers * (1 + len(self.integrate))

    def initial_state(self, n: int, dtype=None, device=None) -> torch.Tensor:
        """n copies of [θ(0), log σ1(θ^(1)(0)), …, 0 for the integrated terms], shape (n, state_size)."""
        theta = super().initial_state(1, dtype=dtype, device=device)
        logk = self.direct_lipschitz(theta, per_layer=True).log()
        zeros = logk.new_zeros(1, self.n_layers * len(self.integrate))
        return torch.cat([theta, logk, zeros], 1).repeat(int(n), 1)

    def integrated(self, ys: torch.Tensor, name: str, per_layer: bool = True) -> torch.Tensor:
        """∫_0^t term^(ℓ) ds of a term named in ``integrate``: (..., L), or the sum over layers."""
        if name not in self.integrate:
            raise KeyError(f"{name!r} is not integrated; pass integrate=({name!r},) (integrated: {self.integrate})")
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
        return dict(self._coefficients(t, y)[0].terms)

    def _route(self, shape, device) -> str:
        """The decomposition route of a layer: ``"fast"`` for CPU layers of at least
        :data:`FAST_MIN_DIM` rows and columns (one Gram eigensolve per trajectory), else a
        batched SVD over the trajectories."""
        if self.decomposition != "auto":
            return self.decomposition
        return "fast" if torch.device(device).type == "cpu" and min(shape) >= FAST_MIN_DIM else "svd"

    def _evaluate(self, t: float, y: torch.Tensor, v: Optional[torch.Tensor]):
        c = self._draw(t, y)
        n, M = y.shape[0], self.M
        Ws = self.weight_matrices(y[:, : self.n_params].detach())
        decs = [_decompose_batched(W, self._route(W.shape[1:], y.device), self.gap_tol) for W in Ws]
        for layer, d in zip(self.layers, decs):
            self._check_gap(float(d.s1.min()), float(d.gap.min()), layer.name, t)
        # The projections g_i v1, g_iᵀ u1 of every layer on the noise mini-batch.
        Gv = [y.new_empty(n, M, layer.shape[0]) for layer in self.layers]
        Gtu = [y.new_empty(n, M, W.shape[-1]) for layer, W in zip(self.layers, Ws)]
        if c.noise is not None:  # materialised: from the per-sample rows (centred and scaled; the terms are centred)
            rows = dict(zip((s.name for s in self.layout.specs), c.noise))
            scale = self._noise_scale()
            for i, (wname, d) in enumerate(zip(self.layout.weight_names, decs)):
                E = rows[wname].reshape(n, M, *Ws[i].shape[1:]) / scale
                Gv[i] = (E @ d.v1[:, None, :, None]).squeeze(-1)
                Gtu[i] = (d.u1[:, None, None, :] @ E).squeeze(-2)
            inc = None if v is None else self._g_prod_rows(c, v)
        else:
            def on_chunk(sl, xs, deltas):
                for i, (layer, d) in enumerate(zip(self.layers, decs)):
                    Gv[i][sl], Gtu[i][sl] = _layer_projections(
                        layer, xs[layer.name], deltas[layer.name], d.u1[sl], d.v1[sl])

            inc = self._factored_pass(c, v, capture=True, on_chunk=on_chunk)[1]
        log_drift, lam, terms = [], [], {k: [] for k in TERM_NAMES}
        lam_scale = self._noise_scale()
        for i, (wname, d) in enumerate(zip(self.layout.weight_names, decs)):
            m, k = Ws[i].shape[1:]
            gW = c.grad[wname].to(y.dtype).reshape(-1, m, k).expand(n, m, k)
            grad_proj = torch.einsum("na,nab,nb->n", d.u1, gW, d.v1)
            mu, kappa, lam2 = _layer_terms_batched(d, Gv[i], Gtu[i], grad_proj, self.lr, self.weight_decay, self.gap_tol)
            if self.include_step_curvature or "step_curvature" in self.integrate:
                sc = self._step_curvature(d, gW, kappa)
                terms.setdefault("step_curvature", []).append(sc)
            proj = ((Gv[i] - Gv[i].mean(1, keepdim=True)) * d.u1.unsqueeze(1)).sum(-1)  # u1ᵀ E_i v1, (n, M)
            lam_row = proj * (lam_scale / d.s1).unsqueeze(1)
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
            for name, val in zip(TERM_NAMES, (d.s1, mu, kappa, lam2)):
                terms[name].append(val)
        c.log_drift = torch.stack(log_drift, 1).to(y.dtype)
        c.terms = {k: torch.stack(val, 1) for k, val in terms.items()}
        integrals = [c.terms[k].to(y.dtype) for k in self.integrate]
        c.drift = torch.cat([c.drift.to(y.dtype), c.log_drift, *integrals], 1)
        c.lam = torch.stack(lam, 1).to(y.dtype)  # (n, L, M)
        return c, inc

    def _step_curvature(self, d: _Decomposition, gW: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
        """(η/2σ1) ∇Lᵀ H ∇L per trajectory: the O(η) drift of log K that a discrete step of length η adds.

        With a batch drift ĝ of B samples, E[ĝᵀHĝ] = ∇LᵀH∇L + tr(H Var[g])/B, and
        (η/2σ1) tr(H Var[g])/B = κ·M/B: subtracted, the estimate is unbiased.
        """
        gv = (gW @ d.v1.unsqueeze(-1)).squeeze(-1)
        gtu = (d.u1.unsqueeze(1) @ gW).squeeze(1)
        sc = self.lr / (2 * d.s1) * _gradient_quadform_batched(d, gv, gtu)
        src = self.gradient_fn
        if self.data is not None and src.grad_source == "batch":
            sc = sc - kappa * (self.M / src.grad_batch_size)
        return sc

    def _check_gap(self, sigma1: float, gap: float, name: str, t: float) -> None:
        # Assumption 11 over all trajectories; a degenerate layer warns once per system.
        warned = self.__dict__.setdefault("_gap_warned", set())
        policy = self.on_degenerate
        if policy == "warn" and name in warned:
            policy = "ignore"
        if check_gap(sigma1, gap, self.gap_tol, policy, name=f"{name} (t = {t:g}, smallest gap over trajectories)"):
            warned.add(name)

    def _block_of_layer(self):
        return list(self.layout.layer_blocks)

    def _g_prod(self, c: _Coefficients, y, v, inc):
        out = super()._g_prod(c, y, v, inc)
        P = self.n_params
        for i, b in enumerate(self._layer_blocks):
            vb = v[:, self.brownian_slice(b)].to(c.lam.dtype)
            out[:, P + i] = (c.lam[:, i] * vb).sum(-1)
        return out

    def _g_dense(self, c: _Coefficients, y):
        G = super()._g_dense(c, y)
        P = self.n_params
        for i, b in enumerate(self._layer_blocks):
            G[:, P + i, self.brownian_slice(b)] = c.lam[:, i]
        return G

    @property
    def _layer_blocks(self):
        lb = getattr(self, "_layer_blocks_cache", None)
        if lb is None:
            lb = self._block_of_layer()
            self._layer_blocks_cache = lb
        return lb

    @classmethod
    def from_record(cls, record, **kwargs):
        """The reduced Z-system of a tracking record: see :meth:`ReducedLipschitzSDE.from_record`."""
        from .reduced import ReducedLipschitzSDE

        return ReducedLipschitzSDE.from_record(record, **kwargs)
