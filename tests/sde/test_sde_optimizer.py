"""OptimizerSDE (momentum, Nesterov, Adam/AdamW, RMSprop): the Euler step against real optimizer steps, one-step
moments against the optimizer's one-step map over random batches, and the log K rows."""

from __future__ import annotations

import math

import pytest
import torch
import torchsde
from hypothesis import Phase, given, settings, strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

from sdelip.errors import UnsupportedOptimizerSDEError
from sdelip.sde import GradientEstimate, NoiseOptions, OptimizerSDE, SecondMomentOptions

N = 40


def _problem(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 2, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, X, Y


def _loss(model):
    def loss(params, x, y):
        return nn.functional.cross_entropy(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))
    return loss


def _full_set_gradient_fn(model, X, Y):
    """A gradient_fn whose noise columns are all N samples: a driver can then select any batch."""
    per = vmap(vmap(grad(_loss(model)), in_dims=(None, 0, 0)), in_dims=(0, None, None))

    def fn(params):
        ps = per(params, X, Y)
        return GradientEstimate(grad={k: v.mean(1) for k, v in ps.items()}, per_sample=ps)
    return fn


OPTIMIZERS = {
    "heavy ball": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "heavy ball, dampening, decay": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3,
                                                              weight_decay=0.01),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.02),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1),
}


def _batch_increment(sde, B, dt):
    """The driver increment (1, brownian_size) that makes G·ΔW the batch B's own noise over dt: −dt(ḡ_B − ∇L)."""
    wb = torch.zeros(N, dtype=torch.float64)
    wb[B] = -dt / (len(B) * sde.column_scale())
    return wb.repeat(sde.brownian_size // N).unsqueeze(0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_euler_step_with_the_batchs_own_noise_is_the_optimizer_step(name):
    """At dt = η, with ΔW chosen so that G·ΔW = −η(ḡ_B − ∇L), one Euler step is the real optimizer step
    from the matching optimizer state: θ, b, p and m exactly; Adam's v differs by (1 − β2)(ĝ_B² − ĝ² − diag Σ̂),
    the fluctuation the SDE drops."""
    model, X, Y = _problem()
    opt = OPTIMIZERS[name](model.parameters())
    sde = OptimizerSDE(model, optimizer=opt, gradient_fn=_full_set_gradient_fn(model, X, Y), noise_batch_size=N)
    P, eta, h = sde.n_params, sde.lr, sde.hp
    gen = torch.Generator().manual_seed(1)
    # a state after a few steps: θ, and the moments of the next step
    theta = sde.layout.flatten_model(model)
    rows = [0.3 * torch.randn(P, generator=gen, dtype=torch.float64) for _ in sde.state_rows]
    if sde.family == "adam":
        rows[1] = rows[1].abs() * 0.1
    k = 4  # t = kη: the state holds the moments of step j = k + 1
    t = k * eta
    y = torch.cat([theta] + rows).unsqueeze(0)
    p = sde.direction(t, y)
    theta_plus = theta - eta * p[0]
    B = torch.randperm(N, generator=gen)[:5]
    v = _batch_increment(sde, B, eta)
    f, gv = sde.f_and_g_prod(t, y, v)
    y1 = (y + eta * f + gv)[0]

    # the real step from (θ⁺, the state's moments), on the batch B
    with torch.no_grad():
        for (nm, prm) in model.named_parameters():
            prm.copy_(sde.layout.unflatten(theta_plus.unsqueeze(0))[nm][0])
    names = dict(model.named_parameters())
    unflat = lambda r: {k_: v_[0] for k_, v_ in sde.layout.unflatten(r.unsqueeze(0)).items()}
    for nm, prm in names.items():
        st_ = opt.state[prm]
        if sde.family == "adam":
            st_["step"] = torch.tensor(float(k + 1))
            st_["exp_avg"], st_["exp_avg_sq"] = unflat(rows[0])[nm].clone(), unflat(rows[1])[nm].clone()
        else:
            st_["momentum_buffer"] = unflat(rows[0])[nm].clone()
    model.zero_grad()
    nn.functional.cross_entropy(model(X[B]), Y[B]).backward()
    gB = sde.layout.flatten({k_: q.grad.unsqueeze(0) for k_, q in names.items()})[0]
    opt.step()
    theta_real = sde.layout.flatten_model(model)
    state = lambda key: sde.layout.flatten({k_: opt.state[q][key].unsqueeze(0) for k_, q in names.items()})[0]

    torch.testing.assert_close(sde.row(y1, "theta"), theta_plus, rtol=0, atol=1e-14)
    if sde.family == "adam":
        torch.testing.assert_close(sde.row(y1, "exp_avg"), state("exp_avg"), rtol=0, atol=1e-13)
        ghat = -sde.evaluate(t, y)[0].drift[0] + h["wd_coupled"] * theta_plus
        gBh = gB + h["wd_coupled"] * theta_plus
        diag = sde._coefficients(t, y, v).diag_var[0]
        dropped = (1 - h["beta2"]) * (gBh ** 2 - ghat ** 2 - diag)
        torch.testing.assert_close(sde.row(y1, "exp_avg_sq") + dropped, state("exp_avg_sq"), rtol=0, atol=1e-13)
        y1_real = y1.clone()
        sde.row(y1_real, "exp_avg_sq").copy_(state("exp_avg_sq"))
        p1 = sde.direction(t + eta, y1_real.unsqueeze(0))[0]
    else:
        torch.testing.assert_close(sde.row(y1, "momentum_buffer"), state("momentum_buffer"), rtol=0, atol=1e-13)
        p1 = sde.direction(t + eta, y1.unsqueeze(0))[0]
    # the next θ of the SDE is the real optimizer's parameters after the step
    torch.testing.assert_close(theta_plus - eta * p1, theta_real, rtol=0, atol=1e-13)


def _real_one_step(sde, y, t, X, Y, batches):
    """The optimizer's one-step map of state y over the given batches (n_batches, state rows) — written out."""
    h, eta = sde.hp, sde.lr
    theta_plus = sde.row(y, "theta") - eta * sde.direction(t, y)
    params = {k: v.expand(len(batches), *v.shape[1:]) for k, v in sde.layout.unflatten(theta_plus).items()}
    loss = _loss(sde.model)
    bl = lambda p, xb, yb: vmap(loss, in_dims=(None, 0, 0))(p, xb, yb).mean()
    g = sde.layout.flatten(vmap(grad(bl))(params, X[batches], Y[batches]))
    g = g + h["wd_coupled"] * theta_plus
    if sde.family == "adam":
        m = h["beta1"] * sde.row(y, "exp_avg") + (1 - h["beta1"]) * g
        v = h["beta2"] * sde.row(y, "exp_avg_sq") + (1 - h["beta2"]) * g * g
        return [m, v]
    b = h["beta"] * sde.row(y, "momentum_buffer") + (1 - h["dampening"]) * g
    return [b] + ([g + h["beta"] * b] if sde.family == "nesterov" else [])


@settings(max_examples=6, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(beta=st.floats(0.5, 0.95), damp=st.sampled_from([0.0, 0.4]), nesterov=st.booleans(),
       adam=st.booleans(), seed=st.integers(0, 100))
def test_one_step_moments_match_the_optimizers_map_over_random_batches(beta, damp, nesterov, adam, seed):
    """Mean and variance (along a random direction) of each state row's one-step change: the Euler step of the
    SDE (its own random noise batches, Gaussian driver) against the real map over batches of M iid samples
    (the SDE's Σ̂ from M distinct samples has mean N/(N − 1) times theirs)."""
    n_draw, M, n_data = 3000, 4, 200
    model, X, Y = _problem(seed, n_data)
    if adam:
        opt = torch.optim.Adam(model.parameters(), lr=0.02, betas=(beta, 0.9))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=beta, dampening=0.0 if nesterov else damp,
                              nesterov=nesterov)
    sde = OptimizerSDE(model, (X, Y), opt, noise_batch_size=M, seed=seed,
                       noise=NoiseOptions(coupling="shared"))  # the real noise is correlated across layers
    y0 = sde.initial_state(1, seed=seed)
    t = 3 * sde.lr
    y = y0.expand(n_draw, -1).clone()
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n_draw, sde.brownian_size, generator=gen, dtype=torch.float64) * math.sqrt(sde.lr)
    f, gv = sde.f_and_g_prod(t, y, v)
    step = sde.lr * f + gv
    batches = torch.randint(0, n_data, (n_draw, M), generator=gen)  # iid samples
    real = _real_one_step(sde, y0, t, X, Y, batches)
    u = torch.randn(sde.n_params, generator=gen, dtype=torch.float64)
    fpc = (n_data - 1) / n_data  # real (iid samples) variance ÷ the SDE's (noise batches of distinct samples)
    for r, name in enumerate(sde.state_rows):
        d_sde = sde.row(step, name) @ u
        d_real = (real[r] - sde.row(y0, name)) @ u
        se = math.sqrt((d_real.var() + d_sde.var()) / n_draw)
        assert abs(float(d_sde.mean() - d_real.mean())) < 4.5 * se + 1e-12, (name, d_sde.mean(), d_real.mean())
        if name == "exp_avg_sq":  # no diffusion: v moves with dt only (its drift carries the estimated diag Σ̂)
            assert float(sde.row(gv, name).abs().max()) == 0.0
            continue
        ratio = float(d_real.var() / d_sde.var()) / fpc
        assert abs(ratio - 1) < 4.5 * math.sqrt(2 / n_draw) * 2 + 0.03, (name, ratio)
    torch.testing.assert_close(sde.row(step, "theta"), -sde.lr * sde.direction(t, y), rtol=0, atol=1e-15)


def test_adam_diag_variance_factored_equals_materialised():
    model, X, Y = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    a = OptimizerSDE(model, (X, Y), opt, noise_batch_size=5, engine="factored", seed=3)
    b = OptimizerSDE(model, (X, Y), opt, noise_batch_size=5, engine="materialised", seed=3)
    assert a._linear_only()
    ya, yb = a.initial_state(3, seed=2), b.initial_state(3, seed=2)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    v = torch.randn(3, a.brownian_size, dtype=torch.float64) * 0.1
    for x, y in zip(a.f_and_g_prod(0.01, ya, v), b.f_and_g_prod(0.01, yb, v)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["heavy ball", "adamw"])
def test_log_k_rows_converge_to_the_direct_product_along_the_same_paths(name):
    """θ moves with dt only, so d log σ1 = −u1ᵀ p v1/σ1 dt has no Itô term: the integrated rows converge to
    log Π σ1(θ(t)) of the same path at first order in dt (no κ, no −½‖λ‖²)."""
    model, X, Y = _problem()
    opt = OPTIMIZERS[name](model.parameters())
    errs = []
    for div in (1, 4, 16):
        sde = OptimizerSDE(model, (X, Y), opt, noise_batch_size=5, log_k=True, seed=0)
        n, T = 4, 8 * sde.lr
        y0 = sde.initial_state(n, seed=0)
        torch.testing.assert_close(sde.lipschitz(y0), sde.direct_lipschitz(y0))
        dt = sde.lr / div
        bm = sde.brownian_motion(n, dt=dt, dtype=torch.float64)
        ys = torchsde.sdeint(sde, y0, torch.tensor([0.0, T], dtype=torch.float64), bm=bm, dt=dt, method="euler")
        errs.append(float((sde.lipschitz(ys[-1]).log() - sde.direct_lipschitz(ys[-1]).log()).abs().max()))
    assert errs[1] < errs[0] / 2.5 and errs[2] < errs[1] / 2.5, errs


def test_unsupported_optimizers_are_refused():
    model, X, Y = _problem()
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.RMSprop(model.parameters(), centered=True),
                torch.optim.RMSprop(model.parameters(), momentum=0.9), torch.optim.Adagrad(model.parameters()),
                torch.optim.Adam(model.parameters(), amsgrad=True),
                torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=True),
                torch.optim.SGD([next(model.parameters())], lr=0.1, momentum=0.9)):
        with pytest.raises(UnsupportedOptimizerSDEError):
            OptimizerSDE(model, (X, Y), opt)
    with pytest.raises(UnsupportedOptimizerSDEError, match="Itô"):  # RMSprop's θ diffuses
        OptimizerSDE(model, (X, Y), torch.optim.RMSprop(model.parameters()), noise_batch_size=5, log_k=True)


RMSPROP = {
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "rmsprop, alpha, decay": lambda p: torch.optim.RMSprop(p, lr=0.005, alpha=0.9, eps=1e-6, weight_decay=0.03),
}


@pytest.mark.parametrize("name", list(RMSPROP))
def test_rmsprop_euler_step_with_the_batchs_own_noise_is_the_optimizer_step(name):
    """RMSprop's state is (θ_k, v_k). At dt = η with the batch's own noise, the Euler step moves θ by
    −η ĝ_B/(√v⁺ + ε) (v⁺ the SDE's expected next v) and the real step by −η ĝ_B/(√v_real + ε): both
    times their own √v + ε are −η ĝ_B exactly; v differs from the real square_avg by (1 − α)(ĝ_B² − ĝ² −
    diag Σ̂)."""
    model, X, Y = _problem()
    opt = RMSPROP[name](model.parameters())
    sde = OptimizerSDE(model, optimizer=opt, gradient_fn=_full_set_gradient_fn(model, X, Y), noise_batch_size=N)
    P, eta, h = sde.n_params, sde.lr, sde.hp
    gen = torch.Generator().manual_seed(1)
    theta = sde.layout.flatten_model(model)
    v0 = 0.01 * torch.rand(P, generator=gen, dtype=torch.float64)
    y = torch.cat([theta, v0]).unsqueeze(0)
    B = torch.randperm(N, generator=gen)[:5]
    w = _batch_increment(sde, B, eta)
    t = 3 * eta
    f, gv = sde.f_and_g_prod(t, y, w)
    y1 = (y + eta * f + gv)[0]
    c = sde._coefficients(t, y, w)
    v_plus = (y + eta * f)[0, P:]

    names = dict(model.named_parameters())
    unflat = lambda r: {k_: v_[0] for k_, v_ in sde.layout.unflatten(r.unsqueeze(0)).items()}
    for nm, prm in names.items():
        opt.state[prm]["step"] = torch.tensor(3.0)
        opt.state[prm]["square_avg"] = unflat(v0)[nm].clone()
    model.zero_grad()
    nn.functional.cross_entropy(model(X[B]), Y[B]).backward()
    gB = sde.layout.flatten({k_: q.grad.unsqueeze(0) for k_, q in names.items()})[0] + h["wd_coupled"] * theta
    opt.step()
    theta_real = sde.layout.flatten_model(model)
    v_real = sde.layout.flatten({k_: opt.state[q]["square_avg"].unsqueeze(0) for k_, q in names.items()})[0]

    torch.testing.assert_close((sde.row(y1, "theta") - theta) * (v_plus.sqrt() + h["eps"]), -eta * gB,
                               rtol=0, atol=1e-14)
    torch.testing.assert_close((theta_real - theta) * (v_real.sqrt() + h["eps"]), -eta * gB, rtol=0, atol=1e-14)
    ghat, diag = c.ghat[0], c.diag_var[0]
    dropped = (1 - h["alpha"]) * (gB ** 2 - ghat ** 2 - diag)
    torch.testing.assert_close(sde.row(y1, "square_avg") + dropped, v_real, rtol=0, atol=1e-15)


def test_adam_drawn_first_step_squares_the_same_draw_as_the_first_moment():
    """``first_step="drawn"``: v_1 = (1 − β2)ĝ_0² from the same draw ξ_0 as m_1 = (1 − β1)ĝ_0 (the default's m_1)."""
    model, X, Y = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    sde = OptimizerSDE(model, (X, Y), opt, noise_batch_size=5, seed=2,
                       second_moment=SecondMomentOptions(first_step="drawn"))
    y0 = sde.initial_state(3, seed=4)
    m1, v1 = sde.row(y0, "exp_avg"), sde.row(y0, "exp_avg_sq")
    torch.testing.assert_close(v1, (0.05 / 0.2 ** 2) * m1 * m1, rtol=1e-12, atol=0)
    ref = OptimizerSDE(model, (X, Y), opt, noise_batch_size=5, seed=2)
    y_ref = ref.initial_state(3, seed=4)
    torch.testing.assert_close(ref.row(y_ref, "exp_avg"), m1, rtol=0, atol=0)
    assert not torch.allclose(ref.row(y_ref, "exp_avg_sq"), v1)


@settings(max_examples=5, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(alpha=st.floats(0.95, 0.999), wd=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 100))
def test_rmsprop_one_step_moments_match_the_optimizers_map_over_random_batches(alpha, wd, seed):
    """RMSprop from a state (θ, v) with v near E[ĝ_B²]: mean and variance along a random direction of θ's
    one-step change, and the mean of v's, Euler step (Gaussian driver) against the real map over batches of M
    iid samples. The real θ step −η ĝ_B/(√(αv + (1 − α)ĝ_B²) + ε) differs from the SDE's at O(1 − α)."""
    n_draw, M, n_data = 3000, 4, 200
    model, X, Y = _problem(seed, n_data)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.02, alpha=alpha, weight_decay=wd)
    sde = OptimizerSDE(model, (X, Y), opt, noise_batch_size=M, seed=seed, noise=NoiseOptions(coupling="shared"))
    gen = torch.Generator().manual_seed(seed)
    theta = sde.layout.flatten_model(model).unsqueeze(0)
    loss = _loss(model)
    bl = lambda p, xb, yb: vmap(loss, in_dims=(None, 0, 0))(p, xb, yb).mean()
    params = {k: v.expand(n_draw, *v.shape[1:]) for k, v in sde.layout.unflatten(theta).items()}
    batches = torch.randint(0, n_data, (n_draw, M), generator=gen)
    g = sde.layout.flatten(vmap(grad(bl))(params, X[batches], Y[batches])) + wd * theta
    v0 = (g * g).mean(0, keepdim=True)  # a second moment as after many steps at θ
    y0 = torch.cat([theta, v0], 1)
    y = y0.expand(n_draw, -1).clone()
    w = torch.randn(n_draw, sde.brownian_size, generator=gen, dtype=torch.float64) * math.sqrt(sde.lr)
    f, gv = sde.f_and_g_prod(0.0, y, w)
    step = sde.lr * f + gv
    v_real = alpha * v0 + (1 - alpha) * g * g
    real = {"theta": -sde.lr * g / (v_real.sqrt() + opt.param_groups[0]["eps"]), "square_avg": v_real - v0}
    u = torch.randn(sde.n_params, generator=gen, dtype=torch.float64)
    fpc = (n_data - 1) / n_data
    for name in ("theta", "square_avg"):
        d_sde, d_real = sde.row(step, name) @ u, real[name] @ u
        se = math.sqrt((d_real.var() + d_sde.var()) / n_draw)
        assert abs(float(d_sde.mean() - d_real.mean())) < 4.5 * se + 1e-12, (name, d_sde.mean(), d_real.mean())
    assert float(sde.row(gv, "square_avg").abs().max()) == 0.0
    d_sde, d_real = sde.row(step, "theta") @ u, real["theta"] @ u
    ratio = float(d_real.var() / d_sde.var()) / fpc
    assert abs(ratio - 1) < 4.5 * math.sqrt(2 / n_draw) * 2 + 0.03 + 2 * (1 - alpha), ratio


def test_euler_step_at_a_fraction_of_eta_with_that_lookahead_is_the_svag_scaled_momentum_step():
    """dt = h = η/ℓ: one Euler step with the batch's own noise (scaled to dt) is torch's SGD step with lr η/ℓ,
    momentum 1 − (1 − β)/ℓ, dampening 1 − (1 − d)/ℓ at θ⁺ = θ − (η/ℓ)b (SVAG's scaling of docs/theory.md §16)."""
    ell, beta = 4, 0.9
    model, X, Y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=beta)
    sde = OptimizerSDE(model, optimizer=opt, gradient_fn=_full_set_gradient_fn(model, X, Y), noise_batch_size=N,
                       lookahead=0.1 / ell)
    P, eta = sde.n_params, sde.lr
    dt = eta / ell
    gen = torch.Generator().manual_seed(3)
    theta = sde.layout.flatten_model(model)
    b = 0.3 * torch.randn(P, generator=gen, dtype=torch.float64)
    y = torch.cat([theta, b]).unsqueeze(0)
    B = torch.randperm(N, generator=gen)[:5]
    w = _batch_increment(sde, B, dt)
    f, gv = sde.f_and_g_prod(0.0, y, w)
    y1 = (y + dt * f + gv)[0]
    theta_plus = theta - dt * b
    torch.testing.assert_close(sde.row(y1, "theta"), theta_plus, rtol=0, atol=1e-15)

    svag = torch.optim.SGD(model.parameters(), lr=dt, momentum=1 - (1 - beta) / ell, dampening=1 - 1 / ell)
    names = dict(model.named_parameters())
    with torch.no_grad():
        for nm, prm in names.items():
            prm.copy_(sde.layout.unflatten(theta_plus.unsqueeze(0))[nm][0])
    for nm, prm in names.items():
        svag.state[prm]["momentum_buffer"] = sde.layout.unflatten(b.unsqueeze(0))[nm][0].clone()
    model.zero_grad()
    nn.functional.cross_entropy(model(X[B]), Y[B]).backward()
    svag.step()
    b_real = sde.layout.flatten({k_: svag.state[q]["momentum_buffer"].unsqueeze(0) for k_, q in names.items()})[0]
    torch.testing.assert_close(sde.row(y1, "momentum_buffer"), b_real, rtol=0, atol=1e-14)
    torch.testing.assert_close(theta_plus - dt * b_real, sde.layout.flatten_model(model), rtol=0, atol=1e-15)
    with pytest.raises(UnsupportedOptimizerSDEError):
        OptimizerSDE(model, (X, Y), torch.optim.RMSprop(model.parameters()), noise_batch_size=5, lookahead=0.01)
    with pytest.raises(UnsupportedOptimizerSDEError, match="RMSprop only"):
        OptimizerSDE(model, (X, Y), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), noise_batch_size=5,
                     second_moment=SecondMomentOptions(first_step="drawn"))


def test_rmsprop_drawn_first_step_is_torchs_first_step_on_the_drawn_gradient():
    """``first_step="drawn"``: (θ_1, v_1) of torch's RMSprop from v_0 = 0 on the gradient ĝ_0 + ξ_0 of one draw — the
    same draw as Adam's m_1 under the same seed (so the gradient is the one ``initial_state`` draws)."""
    model, X, Y = _problem()
    opts = SecondMomentOptions(first_step="drawn")
    rms = OptimizerSDE(model, (X, Y), torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, weight_decay=0.1),
                       noise_batch_size=5, seed=2, second_moment=opts)
    y1 = rms.initial_state(3, seed=4)
    adam = OptimizerSDE(model, (X, Y), torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.5, 0.9),
                                                        weight_decay=0.1), noise_batch_size=5, seed=2)
    g0 = adam.row(adam.initial_state(3, seed=4), "exp_avg") / 0.5
    theta0 = rms.layout.flatten_model(model)
    for i in range(3):  # torch's RMSprop step from v_0 = 0 on the gradient g0[i]
        net = _problem()[0]
        opt = torch.optim.RMSprop(net.parameters(), lr=0.01, alpha=0.9, weight_decay=0.1)
        grads = rms.layout.unflatten((g0[i] - 0.1 * theta0).unsqueeze(0))  # torch adds the decay itself
        for nm, prm in net.named_parameters():
            prm.grad = grads[nm][0].clone()
        opt.step()
        torch.testing.assert_close(rms.row(y1[i], "theta"), rms.layout.flatten_model(net), rtol=0, atol=1e-14)
        v = rms.layout.flatten({k: opt.state[q]["square_avg"].unsqueeze(0) for k, q in net.named_parameters()})[0]
        torch.testing.assert_close(rms.row(y1[i], "square_avg"), v, rtol=0, atol=1e-15)
