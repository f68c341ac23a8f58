"""SDEs of SGD with momentum/Nesterov, of Adam/AdamW and of RMSprop, estimated live from a model and its data.

:class:`OptimizerSDE` extends :class:`~sdelip.sde.ParameterSDE` (the same gradient sources,
noise engines, drivers and chunking) with the optimizer's state. The clock is t = k·η (one
optimizer step per unit η of time, as for SGD); the state at time kη holds θ_k and the
optimizer's state *after* step k + 1 (docs/theory.md §16):

- SGD, momentum β, dampening d, coupled weight decay λ (``torch.optim.SGD``), state
  [θ, b] (heavy ball) or [θ, b, p] (Nesterov; p the direction of the next step):

      dθ = −p dt                    (heavy ball: p = b)
      db = ((β − 1)b + (1 − d)ĝ)/η dt − ((1 − d)/η) G dB
      dp = (ĝ + β(βb + (1 − d)ĝ) − p)/η dt − ((1 + β(1 − d))/η) G dB     (Nesterov)

- Adam / AdamW (β1, β2, ε, coupled or decoupled decay), state [θ, m, v]:

      dθ = −(λ_d θ + m/(b1(j)(√(v/b2(j)) + ε))) dt,   j = t/η + 1, b_i(j) = 1 − β_iʲ
      dm = (1 − β1)(ĝ − m)/η dt − ((1 − β1)/η) G dB
      dv = (1 − β2)(ĝ² + diag Σ̂ − v)/η dt          (no diffusion: Malladi et al. 2022)

- RMSprop (α, ε, coupled decay; not centered, no momentum), state [θ, v] holding θ_k and v_k
  themselves (its step direction ĝ_B/(√v_{k+1} + ε) holds the batch's noise, so θ diffuses):

      v⁺ = αv + (1 − α)(ĝ² + diag Σ̂),   P = 1/(√v⁺ + ε)
      dθ = −P∘ĝ dt + P∘(G dB),   dv = (v⁺ − v)/η dt                 (Malladi et al. 2022)

  with ĝ and G dB at θ itself (no look-ahead); there are no log K rows (θ's diffusion would
  need an Itô term).

:class:`~sdelip.sde.SecondMomentOptions` can start Adam's v_1 at the first batch's own square
instead of its expectation (docs/theory.md §16).

with ĝ = ∇L(θ⁺) + λ_c θ⁺ the expected gradient at the parameters the state's step leads to,
θ⁺ = θ − η·(θ's drift), and G dB :class:`~sdelip.sde.ParameterSDE`'s noise increment at θ⁺
(√η Σ̂^{1/2} dB in law; −G·ΔW/η is the gradient noise ξ of one mini-batch when ΔW spans
dt = η). θ moves with dt only, so log σ1(θ) has no Itô term:
d log σ1 = −u1ᵀ(dθ/dt)v1/σ1 dt (``log_k=True`` carries these rows per tracked layer).

An Euler step at dt = η with ΔW replaced by the batch's own noise is the optimizer's step
(θ, b, p and m exactly; Adam's and RMSprop's v up to (1 − β2)(ξ² + 2ĝξ − diag Σ̂), the fluctuation
the SDE drops, and RMSprop's θ up to the v its step divides by). With ``lookahead=h`` the
gradient is evaluated at θ − h·p; at dt = h = η/ℓ the Euler step is SVAG's ℓ-th momentum step.
:meth:`OptimizerSDE.initial_state` takes the first step's state from one mini-batch noise draw at
θ_0 (b_1 = ĝ_0 without dampening, as PyTorch; m_1 = (1 − β1)ĝ_0, v_1 its expectation or, with
``SecondMomentOptions(first_step="drawn")``, the same draw's square).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import UnsupportedOptimizerSDEError
from .evaluation import NoiseObserver
from .options import SecondMomentOptions
from .parameter_sde import ParameterSDE

__all__ = ["OptimizerSDE", "optimizer_hyperparameters"]


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None) -> dict:
    """The family (``"momentum"``, ``"nesterov"``, ``"adam"``, ``"rmsprop"``) and hyper-parameters of an optimizer.

    Raises:
        UnsupportedOptimizerSDEError: another optimizer class, several param groups, a group that
            misses some of the model's trainable parameters, amsgrad, maximize, SGD momentum 0
            (use :class:`~sdelip.sde.ParameterSDE`), RMSprop centered or with momentum, a tensor or
            non-positive lr.
    """
    name = type(optimizer).__name__
    if len(optimizer.param_groups) != 1:
        raise UnsupportedOptimizerSDEError(f"{name}: OptimizerSDE needs one param group, got "
                                           f"{len(optimizer.param_groups)}")
    g = optimizer.param_groups[0]
    if model is not None:
        ids = {id(p) for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
        if missing:
            raise UnsupportedOptimizerSDEError(f"{name}: the model's parameters {missing} are not in the optimizer")
    if g.get("maximize", False):
        raise UnsupportedOptimizerSDEError(f"{name}: maximize=True is not modelled")
    lr = g["lr"]
    if isinstance(lr, torch.Tensor) or not float(lr) > 0:
        raise UnsupportedOptimizerSDEError(f"{name}: lr must be a positive float, got {lr!r}")
    lr, wd = float(lr), float(g.get("weight_decay", 0.0))
    if type(optimizer) is torch.optim.SGD:
        beta = float(g["momentum"])
        if beta == 0:
            raise UnsupportedOptimizerSDEError("SGD without momentum: use ParameterSDE (Def 4)")
        return dict(family="nesterov" if g["nesterov"] else "momentum", lr=lr, beta=beta,
                    dampening=float(g["dampening"]), wd_coupled=wd, wd_decoupled=0.0)
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        if g["amsgrad"]:
            raise UnsupportedOptimizerSDEError(f"{name}: amsgrad=True is not modelled")
        decoupled = bool(g.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        b1, b2 = (float(b) for b in g["betas"])
        return dict(family="adam", lr=lr, beta1=b1, beta2=b2, eps=float(g["eps"]),
                    wd_coupled=0.0 if decoupled else wd, wd_decoupled=wd if decoupled else 0.0)
    if type(optimizer) is torch.optim.RMSprop:
        if g["centered"]:
            raise UnsupportedOptimizerSDEError("RMSprop: centered=True is not modelled (its state has the "
                                               "gradient's running mean as a third row)")
        if g["momentum"]:
            raise UnsupportedOptimizerSDEError("RMSprop: momentum > 0 is not modelled (its step direction is "
                                               "a buffer of noisy preconditioned gradients)")
        return dict(family="rmsprop", lr=lr, alpha=float(g["alpha"]), eps=float(g["eps"]), wd_coupled=wd,
                    wd_decoupled=0.0)
    raise UnsupportedOptimizerSDEError(f"no SDE for {type(optimizer).__module__}.{type(optimizer).__qualname__}; "
                                       "supported: torch.optim.SGD (momentum > 0, Nesterov), Adam, AdamW, "
                                       "RMSprop (plain)")


class _SquareSums(NoiseObserver):
    """Σ_i g_i∘g_i and Σ_i g_i of Linear layers' weights and biases from the factored pass's x and δ."""

    def __init__(self, sde, n, ref):
        self.sde, self.sq, self.sm = sde, ref.new_zeros(n, sde.n_params), ref.new_zeros(n, sde.n_params)

    def chunk(self, sl, inputs, deltas):
        lay = self.sde.layout
        for layer, wname in zip(self.sde.layers, lay.weight_names):
            x, d = inputs[layer.name], deltas[layer.name]
            w = lay[wname]
            self.sq[sl, w.start:w.stop] = torch.einsum("cmo,cmi->coi", d * d, x * x).reshape(d.shape[0], -1)
            self.sm[sl, w.start:w.stop] = torch.einsum("cmo,cmi->coi", d, x).reshape(d.shape[0], -1)
            bname = wname[: -len("weight")] + "bias"
            if bname in self.sde._names:
                b = lay[bname]
                self.sq[sl, b.start:b.stop] = (d * d).sum(1)
                self.sm[sl, b.start:b.stop] = d.sum(1)


class _Coefficients:
    __slots__ = ("t", "y", "version", "ev", "drift", "theta_plus", "diag_var", "inc", "v", "ghat", "precond")


class OptimizerSDE(ParameterSDE):
    """The SDE of SGD with momentum/Nesterov or of Adam/AdamW (module docstring), coefficients live.

    Example::

        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sde = OptimizerSDE(model, loader, opt, log_k=True)
        y0 = sde.initial_state(16, seed=0)
        bm = sde.brownian_motion(16)
        ys = torchsde.sdeint(sde, y0, ts, bm=bm, dt=sde.lr, method="euler")
        K = sde.lipschitz(ys)                     # exp Σ log K rows; sde.direct_lipschitz(ys): Π σ1(θ)

    Args:
        model, loader: as :class:`~sdelip.sde.ParameterSDE` (iid sampling only).
        optimizer: a ``torch.optim.SGD`` with momentum > 0 (heavy ball or Nesterov, dampening,
            coupled weight decay), ``torch.optim.Adam`` / ``AdamW`` (no amsgrad) or
            ``torch.optim.RMSprop`` (not centered, no momentum), with one param group holding every
            trainable parameter; η is its lr.
        log_k: add one row log σ1(θ^(ℓ)) per tracked layer (drift −u1ᵀ(p)v1/σ1, no diffusion; not
            for RMSprop, whose θ diffuses).
        second_moment: :class:`~sdelip.sde.SecondMomentOptions` (Adam's v_1; default: at its
            expectation, as the SDE's v throughout).
        lookahead: h ≥ 0 of the point θ⁺ = θ − h·p where ĝ and the noise are evaluated (default η,
            which makes the Euler step at dt = η the optimizer's step). An O(η) shift of the argument
            (docs/theory.md §16); integrating at dt = η/ℓ with h = η/ℓ is SVAG's ℓ-th process with a
            Gaussian batch (momentum SGD with η/ℓ, 1 − β and 1 − d divided by ℓ). Not for RMSprop.
        **kwargs: :class:`~sdelip.sde.ParameterSDE`'s keywords (drift, noise, compute, engine,
            gradient_fn, noise_batch_size, seed, layers, loss_fn); the weight decay comes from
            the optimizer, not from ``DriftOptions``.
    """

    def __init__(self, model: nn.Module, loader=None, optimizer: torch.optim.Optimizer = None, *,
                 log_k: bool = False, second_moment: Optional[SecondMomentOptions] = None,
                 lookahead: Optional[float] = None, **kwargs):
        if optimizer is None:
            raise TypeError("OptimizerSDE needs an optimizer")
        hp = optimizer_hyperparameters(optimizer, model)
        drift = kwargs.get("drift")
        if drift is not None and drift.weight_decay:
            raise UnsupportedOptimizerSDEError("OptimizerSDE takes the weight decay from the optimizer; "
                                               "DriftOptions.weight_decay must be 0")
        if log_k and hp["family"] == "rmsprop":
            raise UnsupportedOptimizerSDEError("RMSprop with log_k=True: θ carries the noise (dθ has a diffusion), "
                                               "so log σ1 needs an Itô term these rows do not have")
        if kwargs.get("sampling", "iid") != "iid":
            raise UnsupportedOptimizerSDEError("OptimizerSDE models iid mini-batches only (sampling='iid')")
        super().__init__(model, loader, hp["lr"], **kwargs)
        self.hp = hp
        self.family = hp["family"]
        self.log_k = bool(log_k)
        if second_moment is not None and self.family not in ("adam", "rmsprop"):
            raise UnsupportedOptimizerSDEError(f"second_moment applies to Adam/AdamW and RMSprop only, not to "
                                               f"{self.family}")
        self.second_moment = SecondMomentOptions() if second_moment is None else second_moment
        if lookahead is not None and (self.family == "rmsprop" or not float(lookahead) >= 0):
            raise UnsupportedOptimizerSDEError(f"lookahead={lookahead!r}: a length ≥ 0, and RMSprop has no look-ahead")
        #: h of θ⁺ = θ − h·p, where the next gradient is evaluated (η: the Euler step at dt = η is the optimizer's)
        self.lookahead = self.lr if lookahead is None else float(lookahead)
        #: the optimizer-state rows after θ, in order
        self.state_rows = {"momentum": ("momentum_buffer",), "nesterov": ("momentum_buffer", "direction"),
                           "adam": ("exp_avg", "exp_avg_sq"), "rmsprop": ("square_avg",)}[self.family]
        self._names = {s.name for s in self.layout.specs}
        self._ocache: Optional[_Coefficients] = None

    # -- sizes and views ----------------------------------------------------------------
    @property
    def state_size(self) -> int:
        """P·(1 + number of optimizer rows), plus L log K rows with ``log_k``."""
        return self.n_params * (1 + len(self.state_rows)) + (len(self.layers) if self.log_k else 0)

    def row(self, ys: torch.Tensor, name: str) -> torch.Tensor:
        """One block of states ys (..., state_size): ``"theta"``, an optimizer row or ``"log_k"`` (..., L)."""
        P = self.n_params
        if name == "theta":
            return ys[..., :P]
        if name == "log_k":
            if not self.log_k:
                raise ValueError("the system has no log K rows (log_k=False)")
            return ys[..., P * (1 + len(self.state_rows)):]
        i = 1 + self.state_rows.index(name)
        return ys[..., i * P:(i + 1) * P]

    def step_index(self, t) -> float:
        """j = t/η + 1: the optimizer's step counter of the state's moments (Adam's bias corrections)."""
        return float(t) / self.lr + 1.0

    def direction(self, t, y: torch.Tensor) -> torch.Tensor:
        """p, the direction of the step the state holds: θ's drift is −p (n, P)."""
        if self.family == "momentum":
            return self.row(y, "momentum_buffer")
        if self.family == "nesterov":
            return self.row(y, "direction")
        if self.family == "rmsprop":
            raise UnsupportedOptimizerSDEError("RMSprop: the step direction ĝ_B/(√v + ε) holds the batch's noise, "
                                               "it is no function of the state (θ's drift is −ĝ/(√v⁺ + ε), "
                                               "docs/theory.md §16)")
        h, j = self.hp, self.step_index(t)
        b1, b2 = 1.0 - h["beta1"] ** j, 1.0 - h["beta2"] ** j
        m, v = self.row(y, "exp_avg"), self.row(y, "exp_avg_sq")
        p = m / (b1 * ((v.clamp(min=0) / b2).sqrt() + h["eps"]))
        if h["wd_decoupled"]:
            p = p + h["wd_decoupled"] * self.row(y, "theta")
        return p

    # -- coefficients ---------------------------------------------------------------------
    def _diag_var_scale(self) -> float:
        """The share of diag Σ̂ in Adam's v target: 1, or 1 − M/B with a batch drift (its own noise adds M/B)."""
        src = self.gradient_fn
        if self.data is not None and src.grad_source == "batch":
            return 1.0 - self.M / src.grad_batch_size
        return 1.0

    def _evaluate_at(self, t: float, theta_plus: torch.Tensor, v: Optional[torch.Tensor], need_var: bool):
        """ParameterSDE's evaluation at θ⁺: (ev, G·v or None, diag Σ̂ (n, P) or None)."""
        ev = self.draw(t, theta_plus)
        n = theta_plus.shape[0]
        observer = None
        if need_var and ev.noise is None and self._linear_only():
            observer = _SquareSums(self, n, theta_plus)
        inc = None if v is None and observer is None else self.noise_pass(ev, v, observer)
        diag = None
        if need_var:
            M = self.M
            if observer is not None:
                diag = (observer.sq - observer.sm.pow(2) / M) / (M * (M - 1))
            else:
                rows = self.noise_rows(ev)
                diag = torch.cat([r.pow(2).sum(1) for r in rows], 1) / (self.lr * self.noise_scale ** 2)
        return ev, inc, diag

    def _linear_only(self) -> bool:
        lay = self.layout
        covered = set(lay.weight_names) | {w[: -len("weight")] + "bias" for w in lay.weight_names}
        return (all(layer.rule.name == "linear" and layer.attr == "weight" for layer in self.layers)
                and self._names <= covered and not self.gradient_fn.shared_noise_batch)

    def _coefficients(self, t, y: torch.Tensor, v: Optional[torch.Tensor]) -> _Coefficients:
        c = self._ocache
        tf = float(t)
        if c is not None and c.y is y and c.version == y._version and c.t == tf:
            if v is not None and (c.v is None or c.v is not v):
                c.inc, c.v = self.noise_pass(c.ev, v), v
            return c
        c = _Coefficients()
        c.t, c.y, c.version, c.v = tf, y, y._version, v
        h, eta = self.hp, self.lr
        with torch.no_grad():
            theta = self.row(y, "theta").detach()
            rms = self.family == "rmsprop"
            p = None if rms else self.direction(tf, y).detach()
            c.theta_plus = theta if rms else theta - self.lookahead * p
            adam = self.family == "adam"
            c.ev, c.inc, c.diag_var = self._evaluate_at(tf, c.theta_plus, v, adam or rms)
            ghat = -c.ev.drift.to(y.dtype)  # ∇L(θ⁺) (ParameterSDE's own weight decay is 0)
            if h["wd_coupled"]:
                ghat = ghat + h["wd_coupled"] * c.theta_plus
            c.ghat = ghat
            if rms:
                vv = self.row(y, "square_avg")
                v_next = h["alpha"] * vv + (1 - h["alpha"]) * (ghat * ghat + self._diag_var_scale() * c.diag_var)
                c.precond = 1.0 / (v_next.clamp(min=0).sqrt() + h["eps"])
                parts = [-ghat * c.precond, (v_next - vv) / eta]
            else:
                parts = [-p]
            if adam:
                m, vv = self.row(y, "exp_avg"), self.row(y, "exp_avg_sq")
                target = ghat * ghat + self._diag_var_scale() * c.diag_var
                parts += [(1 - h["beta1"]) * (ghat - m) / eta, (1 - h["beta2"]) * (target - vv) / eta]
            elif not rms:
                b = self.row(y, "momentum_buffer")
                beta, d = h["beta"], h["dampening"]
                b_mean = beta * b + (1 - d) * ghat
                parts.append((b_mean - b) / eta)
                if self.family == "nesterov":
                    parts.append((ghat + beta * b_mean - self.row(y, "direction")) / eta)
            if self.log_k:
                parts.append(self._log_k_drift(theta, p))
            c.drift = torch.cat(parts, 1)
        self._ocache = c
        return c

    def noise_gains(self) -> tuple:
        """Per optimizer row, the factor a of its increment a·ξ (ξ the mini-batch gradient noise; v's rows 0)."""
        h = self.hp
        if self.family == "adam":
            return (1 - h["beta1"], 0.0)
        if self.family == "rmsprop":
            return (0.0,)
        k = 1 - h["dampening"]
        return (k,) if self.family == "momentum" else (k, 1 + h["beta"] * k)

    def _increment(self, c: _Coefficients, y: torch.Tensor) -> torch.Tensor:
        """The diffusion times v: θ rows 0 (RMSprop: −η·ξ/(√v⁺ + ε)), row r: a_r·ξ with ξ = −(G·v)/η (a_r from
        :meth:`noise_gains`), log K rows 0."""
        out = y.new_zeros(y.shape)
        P = self.n_params
        xi = -c.inc.to(y.dtype) / self.lr  # the gradient noise of one step when v spans dt = η
        for r, a in enumerate(self.noise_gains()):
            if a:
                out[:, (r + 1) * P:(r + 2) * P] = a * xi
        if self.family == "rmsprop":
            out[:, :P] = -self.lr * xi * c.precond
        return out

    def _log_k_drift(self, theta: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """d log σ1(θ^(ℓ))/dt = −u1ᵀ p^(ℓ) v1/σ1 per tracked layer (n, L)."""
        out = []
        for W, D in zip(self.weight_matrices(theta), self.weight_matrices(p)):
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            u1, v1 = U[..., :, 0], Vh[..., 0, :]
            out.append(-torch.einsum("nm,nmk,nk->n", u1, D, v1) / S[..., 0])
        return torch.stack(out, 1)

    def weight_matrices(self, ys: torch.Tensor) -> list:
        """Per tracked layer, θ^(ℓ) of states ys (their θ part; ys may be just θ)."""
        P = self.n_params
        theta = ys[..., :P]
        p = self.layout.unflatten(theta)
        return [p[w].reshape(*theta.shape[:-1], layer.shape[0], -1)
                for w, layer in zip(self.layout.weight_names, self.layers)]

    # -- torchsde -------------------------------------------------------------------------
    def f(self, t, y):
        return self._coefficients(t, y, None).drift

    def g_prod(self, t, y, v):
        return self._increment(self._coefficients(t, y, v), y)

    def f_and_g_prod(self, t, y, v):
        c = self._coefficients(t, y, v)
        return c.drift, self._increment(c, y)

    def evaluate(self, t, y, v=None):
        """The :class:`~sdelip.sde.evaluation.Evaluation` at θ⁺ and G·v (ParameterSDE's, at the look-ahead point)."""
        c = self._coefficients(t, y, v)
        return c.ev, c.inc

    # -- state ------------------------------------------------------------------------------
    def initial_state(self, n: int, dtype: Optional[torch.dtype] = None, device=None, *, seed: int = 0,
                      theta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """n states at t = 0: θ_0 (the model's, or ``theta`` (P,)) and the state after the first step.

        The first step's gradient ĝ_0 = ∇L(θ_0) + λ_cθ_0 + ξ_0 takes ξ_0 from one noise draw per
        trajectory (Gaussian driver of variance η, generator ``seed``): b_1 = ĝ_0 (Nesterov p_1 =
        ĝ_0 + βb_1), or m_1 = (1 − β1)ĝ_0 and v_1 = (1 − β2)E[ĝ_0²] (v without noise, as the SDE;
        (1 − β2)ĝ_0² with ``SecondMomentOptions(first_step="drawn")``). RMSprop's state is θ_0 and
        v_0 = 0, torch's state before the first step (no draw); with ``first_step="drawn"`` it is
        the state *after* a first step on one drawn batch, v_1 = (1 − α)ĝ_0², θ_1 = θ_0 −
        ηĝ_0/(√v_1 + ε) (≈ θ_0 − η·sign(ĝ_0)/√(1 − α), as PyTorch's first step): integrate it from t = η.
        """
        th = self.layout.flatten_model(self.model) if theta is None else theta.reshape(-1)
        th = th.to(dtype=dtype or th.dtype, device=device or th.device).detach()
        n, h = int(n), self.hp
        theta0 = th.unsqueeze(0).repeat(n, 1)
        if self.family == "rmsprop" and self.second_moment.first_step == "expected":
            self._ocache = None  # torch's state before the first step: square_avg = 0
            return torch.cat([theta0, torch.zeros_like(theta0)], 1)
        gen = torch.Generator(device=th.device).manual_seed(int(seed))
        v = torch.randn(n, self.brownian_size, generator=gen, device=th.device, dtype=th.dtype) * math.sqrt(self.lr)
        if self.family == "rmsprop":  # the state after a first step on one drawn batch, at t = η
            with torch.no_grad():
                ev, inc, _ = self._evaluate_at(-self.lr, theta0, v, True)
                g0 = -ev.drift.to(th.dtype) - inc.to(th.dtype) / self.lr
                if h["wd_coupled"]:
                    g0 = g0 + h["wd_coupled"] * theta0
                v1 = (1 - h["alpha"]) * g0 * g0
                y = torch.cat([theta0 - self.lr * g0 / (v1.sqrt() + h["eps"]), v1], 1)
            self._ocache = None
            return y
        with torch.no_grad():
            ev, inc, diag = self._evaluate_at(-self.lr, theta0, v, self.family == "adam")
            gmean = -ev.drift.to(th.dtype) + (h["wd_coupled"] * theta0 if h["wd_coupled"] else 0.0)
            g0 = gmean - inc.to(th.dtype) / self.lr
            if self.family == "adam":
                sq = (g0 * g0 if self.second_moment.first_step == "drawn"
                      else gmean * gmean + self._diag_var_scale() * diag)
                rows = [(1 - h["beta1"]) * g0, (1 - h["beta2"]) * sq]
            else:
                rows = [g0] + ([g0 + h["beta"] * g0] if self.family == "nesterov" else [])
            y = torch.cat([theta0] + rows, 1)
            if self.log_k:
                s1 = self.direct_lipschitz(theta0, per_layer=True)
                y = torch.cat([y, s1.log()], 1)
        self._ocache = None
        return y

    def state_from_optimizer(self, optimizer: torch.optim.Optimizer, last_direction: torch.Tensor) -> torch.Tensor:
        """The SDE state (1, state_size) matching a live optimizer after k ≥ 1 steps.

        The state holds θ_{k−1} and the moments of step k: θ = current parameters + η·p_k, with
        ``last_direction`` p_k (P,) the direction step k applied (Δ = −η p_k). RMSprop's state is
        the current parameters and square_avg (``last_direction`` is not read).
        """
        cur = self.layout.flatten_model(self.model)
        theta = cur + self.lr * last_direction.reshape(-1).to(cur)
        names = dict(self.model.named_parameters())
        def flat(key):
            return self.layout.flatten({k: optimizer.state[names[k]][key].unsqueeze(0) for k in self._names})
        if self.family == "rmsprop":  # the state holds θ_k itself and v_k
            y = torch.cat([cur.unsqueeze(0), flat("square_avg")], 1)
            return y
        rows = [flat("exp_avg"), flat("exp_avg_sq")] if self.family == "adam" else [flat("momentum_buffer")]
        if self.family == "nesterov":
            rows.append(last_direction.reshape(1, -1).to(cur))
        y = torch.cat([theta.unsqueeze(0)] + rows, 1)
        if self.log_k:
            y = torch.cat([y, self.direct_lipschitz(theta.unsqueeze(0), per_layer=True).log()], 1)
        return y

    def direct_lipschitz(self, ys: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """Π σ1(θ^(ℓ)) of the θ part of states ys (per layer with ``per_layer``)."""
        with torch.no_grad():
            s1 = torch.stack([torch.linalg.svdvals(W)[..., 0] for W in self.weight_matrices(ys)], -1)
        return s1 if per_layer else s1.pow(self.uses.to(s1)).prod(-1)

    def lipschitz(self, ys: torch.Tensor) -> torch.Tensor:
        """K(t): exp Σ_ℓ c_ℓ log K^(ℓ) of the integrated rows with ``log_k``, else :meth:`direct_lipschitz`."""
        if self.log_k:
            lk = self.row(ys, "log_k")
            return (lk * self.uses.to(lk)).sum(-1).exp()
        return self.direct_lipschitz(ys)

    @property
    def has_dense_diffusion(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"family={self.family!r}, " + super().extra_repr() + f", log_k={self.log_k}"
