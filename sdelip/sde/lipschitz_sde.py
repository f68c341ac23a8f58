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

import math
from typing import Dict

import torch
from torch.func import vmap

from .._checks import check_gap
from ..dynamics import terms_from_projections
from ..spectral import SpectralDecomposition
from .parameter_sde import ParameterSDE, _Coefficients

__all__ = ["LipschitzSDE"]

#: The names of the per-layer terms returned by :meth:`LipschitzSDE.terms`.
TERM_NAMES = ("sigma1", "drift", "noise_curvature", "diffusion_sq")


def _layer_terms_batched(U, S, V, Gv, Gtu, grad_proj, lr, weight_decay, gap_tol):
    """Thm 14's (μ, κ, ‖λ‖²) for a batch of trajectories via :func:`terms_from_projections`."""

    def one(U, S, V, Gv, Gtu, gp):
        d = SpectralDecomposition(U=U, S=S, V=V, gap_tol=gap_tol)
        t = terms_from_projections(d, Gv, Gtu, lr, grad_proj=gp, weight_decay=weight_decay)
        return t.drift, t.noise_curvature, t.diffusion_sq

    return vmap(one)(U, S, V, Gv, Gtu, grad_proj)


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
        **kwargs: keyword options of :class:`ParameterSDE`.

    The ``include_*`` switches exist to measure what each term is worth; with any of
    them off the log K state no longer follows the parameters.
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
        **kwargs,
    ):
        super().__init__(model, loader, lr, **kwargs)
        self.include_drift = bool(include_drift)
        self.include_noise_curvature = bool(include_noise_curvature)
        self.include_ito_correction = bool(include_ito_correction)
        self.include_diffusion = bool(include_diffusion)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def state_size(self) -> int:
        return self.n_params + self.n_layers

    def initial_state(self, n: int, dtype=None, device=None) -> torch.Tensor:
        """n copies of [θ(0), log σ1(θ^(1)(0)), …], shape (n, state_size)."""
        theta = super().initial_state(1, dtype=dtype, device=device)
        logk = self.direct_lipschitz(theta, per_layer=True).log()
        return torch.cat([theta, logk], 1).repeat(int(n), 1)

    def log_lipschitz(self, ys: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """The Itô-integrated log K^(ℓ) (..., L), or Z = Σ_ℓ log K^(ℓ) (...)."""
        z = ys[..., self.n_params : self.n_params + self.n_layers]
        return z if per_layer else z.sum(-1)

    def lipschitz(self, ys: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """K(t) = exp Z(t) from the Itô-integrated state (Thm 16); per layer K^(ℓ) if asked."""
        return self.log_lipschitz(ys, per_layer).exp()

    def terms(self, t, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Thm 14's per-layer terms at the states y: {name: (n, L)} for σ1, μ, κ, ‖λ‖²."""
        return dict(self._coefficients(t, y).terms)

    def _evaluate(self, t: float, y: torch.Tensor) -> _Coefficients:
        n, params, est, drift_theta, noise = self._parameter_coefficients(y)
        M = self.M
        log_drift, lam, terms = [], [], {k: [] for k in TERM_NAMES}
        for i, (layer, wname) in enumerate(zip(self.layers, self.layout.weight_names)):
            m = layer.shape[0]
            W = params[wname].reshape(n, m, -1)
            k = W.shape[-1]
            G = est.per_sample[wname].to(W.dtype).expand(n, -1, *est.per_sample[wname].shape[2:]).reshape(n, M, m, k)
            gW = est.grad[wname].to(W.dtype).expand(n, *est.grad[wname].shape[1:]).reshape(n, m, k)
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            V = Vh.mT
            u1, v1 = U[..., 0], V[..., 0]
            s1 = S[..., 0]
            gap = (S[..., 0] - S[..., 1]) / S[..., 0] if S.shape[-1] > 1 else torch.ones_like(s1)
            self._check_gap(float(s1.min()), float(gap.min()), layer.name, t)
            Gv = (G @ v1[:, None, :, None]).squeeze(-1)  # g_i v1, (n, M, m)
            Gtu = (u1[:, None, None, :] @ G).squeeze(-2)  # g_iᵀ u1, (n, M, k)
            grad_proj = torch.einsum("na,nab,nb->n", u1, gW, v1)
            mu, kappa, lam2 = _layer_terms_batched(
                U, S, V, Gv, Gtu, grad_proj, self.lr, self.weight_decay, self.gap_tol
            )
            proj = ((Gv - Gv.mean(1, keepdim=True)) * u1.unsqueeze(1)).sum(-1)  # u1ᵀ E_i v1, (n, M)
            lam_row = proj * (math.sqrt(self.lr / (M * (M - 1))) / s1).unsqueeze(1)
            a = torch.zeros_like(mu)
            if self.include_drift:
                a = a + mu
            if self.include_noise_curvature:
                a = a + kappa
            if self.include_ito_correction:
                a = a - 0.5 * lam2
            log_drift.append(a)
            lam.append(lam_row if self.include_diffusion else torch.zeros_like(lam_row))
            for name, v in zip(TERM_NAMES, (s1, mu, kappa, lam2)):
                terms[name].append(v)
        log_drift = torch.stack(log_drift, 1).to(y.dtype)
        drift = torch.cat([drift_theta.to(y.dtype), log_drift], 1)
        c = _Coefficients(t, y, drift, noise)
        c.log_drift = log_drift
        c.lam = torch.stack(lam, 1).to(y.dtype)  # (n, L, M)
        c.terms = {k: torch.stack(v, 1) for k, v in terms.items()}
        return c

    def _check_gap(self, sigma1: float, gap: float, name: str, t: float) -> None:
        # Assumption 11 over all trajectories; a degenerate layer warns once per system.
        warned = self.__dict__.setdefault("_gap_warned", set())
        policy = self.on_degenerate
        if policy == "warn" and name in warned:
            policy = "ignore"
        if check_gap(sigma1, gap, self.gap_tol, policy, name=f"{name} (t = {t:g}, smallest gap over trajectories)"):
            warned.add(name)

    def _block_of_layer(self):
        idx = {}
        for b, block in enumerate(self.layout.blocks):
            if block.layer is not None:
                idx[block.layer] = b
        return [idx[i] for i in range(self.n_layers)]

    def _g_prod(self, c: _Coefficients, y, v):
        out = super()._g_prod(c, y, v)
        M, P = self.M, self.n_params
        for i, b in enumerate(self._layer_blocks):
            vb = v[:, b * M : (b + 1) * M].to(c.lam.dtype)
            out[:, P + i] = (c.lam[:, i] * vb).sum(-1)
        return out

    def _g_dense(self, c: _Coefficients, y):
        G = super()._g_dense(c, y)
        M, P = self.M, self.n_params
        for i, b in enumerate(self._layer_blocks):
            G[:, P + i, b * M : (b + 1) * M] = c.lam[:, i]
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
