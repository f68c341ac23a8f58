"""Optimizer rules (sdelip.optim) against the optimizers themselves, and realised increments.

Oracles, all float64:
* the update: a deep copy of (params, optimizer) really steps; Δ = W_after − W_before must equal
  −lr·P to ≤ 1e-12 relative, over consecutive steps (the state evolves), two param groups;
* the noise scale S = ∂P/∂g of the SGD family: the copy steps with g and with g + ξ
  (P is affine, so the difference is S·ξ exactly);
* the noise scale of the adaptive rules (second moment held fixed): central finite
  differences through the optimizer of P in g, minus the part that flows through the
  second-moment state (finite differences in that state times its known g-dependence);
  ``noise_var`` through a shifted second-moment state;
* realised increments: σ1(θ + hΔ) − σ1(θ) − first − ½Q = O(h³) against torch.linalg.svdvals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sdelip.core.decompositions import GramCurvature, decompose_layer
from sdelip.core.increments import realised_increment
from sdelip.core.spectral import decompose
from sdelip.optim import (AdamRule, NoOptimizerRuleError, SGDRule, UnsupportedOptimizerError, optimizer_rule,
                          register_optimizer_rule, registered_optimizer_rules, require_optimizer_rule,
                          update_model)
from sdelip.optim.base import _REGISTRY, OptimizerRule

DT = torch.float64
TOL = 1e-12


def make_params(seed):
    gen = torch.Generator().manual_seed(seed)
    W1 = torch.nn.Parameter(torch.randn(5, 4, generator=gen, dtype=DT))
    W2 = torch.nn.Parameter(torch.randn(3, 5, generator=gen, dtype=DT))
    b = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=DT))
    return [W1, W2, b]


def loss_fn(params, gen):
    W1, W2, b = params
    x = torch.randn(8, 4, generator=gen, dtype=DT)
    y = torch.randn(8, 3, generator=gen, dtype=DT)
    out = torch.tanh(x @ W1.T) @ W2.T + b
    return ((out - y) ** 2).mean()


def groups(params, cls, g1, g2):
    W1, W2, b = params
    return cls([dict(params=[W1], **g1), dict(params=[W2, b], **g2)])


def set_grads(params, gen):
    for p in params:
        p.grad = None
    loss_fn(params, gen).backward()


def copied(params, opt):
    """A deep copy of (params, optimizer) sharing nothing; Parameter.__deepcopy__ drops .grad, so copy it."""
    cp, copt = copy.deepcopy((params, opt))
    for q, p in zip(cp, params):
        q.grad = None if p.grad is None else p.grad.detach().clone()
    return cp, copt


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check_steps(params, opt, steps=5, seed=0):
    """Over consecutive steps, Δ of a deep-copied optimizer stepping = −lr·P (≤ TOL), state untouched by the rule."""
    gen = torch.Generator().manual_seed(seed + 1000)
    rule = require_optimizer_rule(opt)
    for k in range(steps):
        set_grads(params, gen)
        before = copy.deepcopy(opt.state_dict())
        models = [rule.model(opt, p, name=f"p{i}") for i, p in enumerate(params)]
        after = opt.state_dict()
        for key, st_ in before["state"].items():  # the rule reads, never writes
            for name, val in st_.items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(after["state"][key][name])), (k, name)
        cp, copt = copied(params, opt)
        w0 = [p.detach().clone() for p in cp]
        g0 = [p.grad.clone() for p in cp]  # foreach SGD with Nesterov edits .grad in place
        copt.step()
        for i, (p, w, g, mdl) in enumerate(zip(cp, w0, g0, models)):
            delta = p.detach() - w
            assert rel(mdl.update, delta) <= TOL, (k, i, rel(mdl.update, delta))
            assert rel(mdl.offset + mdl.noise_scale * g, mdl.mean_direction) <= TOL
            assert rel(mdl.mean_direction, mdl.direction) <= TOL  # noise_var=None: P̄ = P
        opt.step()  # the original goes on (the copy proved it does what the rule said)
    return models


# --- registry ---------------------------------------------------------------------------


def test_registry_exact_class_and_strict_error():
    p = torch.nn.Parameter(torch.zeros(2, 2, dtype=DT))
    assert isinstance(optimizer_rule(torch.optim.SGD([p], lr=0.1)), SGDRule)
    assert isinstance(optimizer_rule(torch.optim.AdamW([p])), AdamRule)
    assert optimizer_rule(torch.optim.AdamW) is optimizer_rule(torch.optim.Adam)
    assert set(registered_optimizer_rules()) >= {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW,
                                                 torch.optim.RMSprop, torch.optim.Adagrad}

    class MySGD(torch.optim.SGD):  # may change step(): no silent inheritance
        pass

    opt = MySGD([p], lr=0.1)
    assert optimizer_rule(opt) is None
    with pytest.raises(NoOptimizerRuleError, match=r"MySGD.*subclasses SGD.*supported: .*torch\.optim\.adam\.Adam"):
        require_optimizer_rule(opt)
    assert optimizer_rule(torch.optim.Adamax([p])) is None
    with pytest.raises(NoOptimizerRuleError, match="Adamax"):
        update_model(torch.optim.Adamax([p]), p)


def test_register_explicit_subclass_and_type_errors():
    class MySGD2(torch.optim.SGD):
        pass

    try:
        register_optimizer_rule(MySGD2)(SGDRule)
        p = torch.nn.Parameter(torch.ones(2, 2, dtype=DT))
        assert isinstance(optimizer_rule(MySGD2([p], lr=0.1)), SGDRule)
        assert MySGD2 in SGDRule.optimizer_types and torch.optim.SGD in SGDRule.optimizer_types
    finally:
        _REGISTRY.pop(MySGD2, None)
        SGDRule.optimizer_types = tuple(t for t in SGDRule.optimizer_types if t is not MySGD2)
    with pytest.raises(TypeError):
        register_optimizer_rule(int)
    with pytest.raises(TypeError):
        register_optimizer_rule(torch.optim.SGD)(int)


def test_refusals_name_optimizer_parameter_cause():
    p = torch.nn.Parameter(torch.ones(2, 2, dtype=DT))
    q = torch.nn.Parameter(torch.ones(2, 2, dtype=DT))
    opt = torch.optim.Adam([p])
    with pytest.raises(UnsupportedOptimizerError, match="Adam parameter fc.weight: no gradient"):
        update_model(opt, p, name="fc.weight")
    p.grad = torch.ones_like(p)
    with pytest.raises(UnsupportedOptimizerError, match="not a parameter"):
        update_model(opt, q)
    with pytest.raises(UnsupportedOptimizerError, match="gradient shape"):
        update_model(opt, p, torch.ones(4, dtype=DT))
    with pytest.raises(UnsupportedOptimizerError, match="noise_var shape"):
        update_model(opt, p, noise_var=torch.ones(3, dtype=DT))
    with pytest.raises(UnsupportedOptimizerError, match="differentiable"):
        update_model(torch.optim.Adam([p], differentiable=True), p)
    opt.grad_scale = torch.ones(())
    with pytest.raises(UnsupportedOptimizerError, match="GradScaler"):
        update_model(opt, p)
    z = torch.nn.Parameter(torch.ones(2, dtype=torch.complex128))
    z.grad = torch.ones_like(z)
    with pytest.raises(UnsupportedOptimizerError, match="complex"):
        update_model(torch.optim.SGD([z], lr=0.1), z)
    s = torch.nn.Parameter(torch.ones(3, 2, dtype=DT))
    s.grad = torch.ones(3, 2, dtype=DT).to_sparse()
    with pytest.raises(UnsupportedOptimizerError, match="sparse"):
        update_model(torch.optim.SGD([s], lr=0.1), s)


# --- SGD ----------------------------------------------------------------------------------

sgd_groups = st.fixed_dictionaries(dict(
    lr=st.sampled_from([0.05, 0.3]),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.3]),
    weight_decay=st.sampled_from([0.0, 0.01]),
    nesterov=st.booleans(),
)).map(lambda g: {**g, "dampening": 0.0} if g["nesterov"] else g).map(
    lambda g: {**g, "momentum": max(g["momentum"], 0.5)} if g["nesterov"] else g)


@settings(max_examples=25, deadline=None)
@given(g1=sgd_groups, g2=sgd_groups, maximize=st.booleans(), foreach=st.booleans(), seed=st.integers(0, 99))
def test_sgd_update_exact(g1, g2, maximize, foreach, seed):
    params = make_params(seed)
    opt = groups(params, torch.optim.SGD, g1, g2)
    for g in opt.param_groups:
        g["maximize"], g["foreach"] = maximize, foreach
    check_steps(params, opt, steps=4, seed=seed)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_noise_scale_through_the_optimizer(nesterov, maximize):
    """S·ξ = P(g + ξ) − P(g) through the optimizer, and S against the closed forms of the docstring."""
    beta, d = 0.9, (0.0 if nesterov else 0.25)
    params = make_params(3)
    opt = torch.optim.SGD(params, lr=0.1, momentum=beta, dampening=d, nesterov=nesterov, weight_decay=0.02,
                          maximize=maximize)
    gen = torch.Generator().manual_seed(5)
    sign = -1.0 if maximize else 1.0
    for k in range(3):
        set_grads(params, gen)
        for p in params:
            mdl = update_model(opt, p)
            xi = torch.randn(p.shape, generator=gen, dtype=DT)
            cp, copt = copied(params, opt)
            j = [q is p for q in params].index(True)
            w0 = cp[j].detach().clone()
            cp[j].grad = cp[j].grad + xi
            copt.step()
            p_xi = (w0 - cp[j].detach()) / mdl.lr
            assert rel(p_xi - mdl.direction, mdl.noise_scale * xi) <= 1e-9
            expect = (1 + beta if nesterov else 1.0) if k == 0 else (1 + beta * (1 - d) if nesterov else 1 - d)
            assert mdl.noise_scale == pytest.approx(sign * expect, rel=1e-15)
            assert mdl.first_step == (k == 0)
        opt.step()


# --- Adam / AdamW --------------------------------------------------------------------------

adam_groups = st.fixed_dictionaries(dict(
    lr=st.sampled_from([1e-3, 3e-2]),
    betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]),
    eps=st.sampled_from([1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.1]),
))


@settings(max_examples=25, deadline=None)
@given(g1=adam_groups, g2=adam_groups, cls=st.sampled_from([torch.optim.Adam, torch.optim.AdamW]),
       amsgrad=st.booleans(), maximize=st.booleans(), foreach=st.booleans(), seed=st.integers(0, 99))
def test_adam_update_exact(g1, g2, cls, amsgrad, maximize, foreach, seed):
    params = make_params(seed)
    opt = groups(params, cls, g1, g2)
    for g in opt.param_groups:
        g["amsgrad"], g["maximize"], g["foreach"] = amsgrad, maximize, foreach
    models = check_steps(params, opt, steps=5, seed=seed)
    assert models[0].step == 5 and not models[0].first_step
    wd = g1["weight_decay"]
    assert models[0].decoupled_decay == (wd if cls is torch.optim.AdamW else 0.0)


def test_adam_variants_tensor_lr_fused_and_decoupled_flag():
    # lr as a tensor (foreach=False), fused CPU kernel, Adam(decoupled_weight_decay=True) = AdamW
    for kwargs in (dict(lr=torch.tensor(0.01, dtype=DT), foreach=False),
                   dict(lr=0.01, fused=True),
                   dict(lr=0.01, fused=True, amsgrad=True, maximize=True),
                   dict(lr=0.01, decoupled_weight_decay=True)):
        params = make_params(1)
        opt = torch.optim.Adam(params, weight_decay=0.1, **kwargs)
        models = check_steps(params, opt, steps=4, seed=1)
        assert models[0].decoupled_decay == (0.1 if kwargs.get("decoupled_weight_decay") else 0.0)
        assert isinstance(models[0].lr, float)


def test_adam_first_step_is_sign_like():
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=DT))
    p.grad = torch.randn(4, 3, generator=gen, dtype=DT).clamp_min(0.05) * torch.tensor([1.0, -1.0, 1.0], dtype=DT)
    mdl = update_model(torch.optim.Adam([p], lr=1e-3, eps=1e-12), p)
    assert mdl.first_step and mdl.step == 1
    assert torch.allclose(mdl.direction, torch.sign(p.grad), rtol=0, atol=1e-10)
    # S at t = 1: (1 − β1)/(1 − β1)·D = 1/(|g| + ε)
    assert torch.allclose(mdl.noise_scale, 1 / (p.grad.abs() + 1e-12), rtol=1e-12)


def state_fd_noise_scale(params, opt, j, dependents, h=1e-6):
    """S of parameter j by finite differences through the optimizer, second-moment states held fixed.

    ``dependents``: [(state key, f)] with f(ĝ) = (∂state_t/∂g)/(∂state_t/∂state) elementwise.
    Elementwise maps, so one perturbation of all entries gives the diagonal Jacobian.
    """
    def P_of(gshift=0.0, key=None, sshift=0.0):
        cp, copt = copied(params, opt)
        w0 = cp[j].detach().clone()
        cp[j].grad = cp[j].grad + gshift
        if key is not None:
            st_ = copt.state[cp[j]]
            st_[key] = st_[key] + sshift
        copt.step()
        lr = next(float(g["lr"]) for g in copt.param_groups if any(q is cp[j] for q in g["params"]))
        return (w0 - cp[j].detach()) / lr

    g = params[j].grad
    J = (P_of(h) - P_of(-h)) / (2 * h)
    for key, f in dependents:
        Jv = (P_of(key=key, sshift=h) - P_of(key=key, sshift=-h)) / (2 * h)
        J = J - Jv * f(g)
    return J


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_noise_scale_and_noise_var_through_the_optimizer(cls):
    b1, b2, wd = 0.8, 0.95, 0.05
    params = make_params(7)
    opt = groups(params, cls, dict(lr=0.01, betas=(b1, b2), weight_decay=wd), dict(lr=0.02, betas=(b1, b2)))
    gen = torch.Generator().manual_seed(9)
    for _ in range(6):
        set_grads(params, gen)
        opt.step()
    set_grads(params, gen)
    for j, p in enumerate(params):
        lam_c = wd if (cls is torch.optim.Adam and j == 0) else 0.0
        ghat = lambda g: g + lam_c * p.detach()  # noqa: E731
        S_fd = state_fd_noise_scale(params, opt, j, [("exp_avg_sq", lambda g: 2 * (1 - b2) * ghat(g) / b2)])
        mdl = update_model(opt, p)
        assert rel(mdl.noise_scale, S_fd) <= 1e-7
        # noise_var enters as E[ĝ_b²] = ĝ² + Σ̂: the same as a state shifted by (1 − β2)/β2·Σ̂
        nv = 0.3 * torch.rand(p.shape, generator=gen, dtype=DT) * p.grad**2 + 1e-6
        with_nv = update_model(opt, p, noise_var=nv)
        cp, copt = copied(params, opt)
        copt.state[cp[j]]["exp_avg_sq"] += (1 - b2) / b2 * nv
        shifted = update_model(copt, cp[j])
        assert rel(with_nv.noise_scale, shifted.noise_scale) <= 1e-12
        assert rel(with_nv.mean_direction, shifted.direction) <= 1e-12
        assert rel(with_nv.direction, mdl.direction) <= TOL  # the exact P ignores noise_var
        assert bool((with_nv.noise_scale.abs() < mdl.noise_scale.abs()).all())


def test_amsgrad_noise_var_takes_the_max():
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(3, 3, generator=gen, dtype=DT))
    opt = torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.9), amsgrad=True)
    for k in range(3):
        p.grad = torch.randn(3, 3, generator=gen, dtype=DT) * (3.0 if k == 0 else 0.1)
        opt.step()
    p.grad = torch.randn(3, 3, generator=gen, dtype=DT) * 0.1
    nv = torch.rand(3, 3, generator=gen, dtype=DT)
    st0 = opt.state[p]
    assert bool((st0["max_exp_avg_sq"] > st0["exp_avg_sq"]).any())  # the max is active somewhere
    mdl = update_model(opt, p, noise_var=nv)
    st_ = opt.state[p]
    v_noise = torch.maximum(st_["max_exp_avg_sq"], 0.9 * st_["exp_avg_sq"] + 0.1 * (p.grad**2 + nv))
    b1, b2 = 1 - 0.9**4, 1 - 0.9**4
    D = 1 / ((v_noise / b2).sqrt() + 1e-8)
    assert rel(mdl.noise_scale, 0.1 / b1 * D) <= 1e-13


# --- RMSprop, Adagrad ----------------------------------------------------------------------

rms_groups = st.fixed_dictionaries(dict(
    lr=st.sampled_from([1e-3, 1e-2]),
    alpha=st.sampled_from([0.99, 0.7]),
    eps=st.sampled_from([1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    momentum=st.sampled_from([0.0, 0.9]),
    centered=st.booleans(),
))


@settings(max_examples=25, deadline=None)
@given(g1=rms_groups, g2=rms_groups, maximize=st.booleans(), foreach=st.booleans(), seed=st.integers(0, 99))
def test_rmsprop_update_exact(g1, g2, maximize, foreach, seed):
    params = make_params(seed)
    opt = groups(params, torch.optim.RMSprop, g1, g2)
    for g in opt.param_groups:
        g["maximize"], g["foreach"] = maximize, foreach
    check_steps(params, opt, steps=5, seed=seed)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_noise_scale_and_noise_var_through_the_optimizer(centered, momentum):
    alpha, wd = 0.8, 0.05
    params = make_params(11)
    opt = torch.optim.RMSprop(params, lr=0.01, alpha=alpha, weight_decay=wd, momentum=momentum, centered=centered,
                              maximize=True)
    gen = torch.Generator().manual_seed(12)
    for _ in range(5):
        set_grads(params, gen)
        opt.step()
    set_grads(params, gen)
    for j, p in enumerate(params):
        ghat = lambda g: -g + wd * p.detach()  # noqa: E731  (maximize)
        deps = [("square_avg", lambda g: -2 * (1 - alpha) * ghat(g) / alpha)]
        if centered:
            deps.append(("grad_avg", lambda g: -(1 - alpha) / alpha * torch.ones_like(g)))
        S_fd = state_fd_noise_scale(params, opt, j, deps)
        mdl = update_model(opt, p)
        assert rel(mdl.noise_scale, S_fd) <= 1e-7
        # noise_var: E[a_t] − E[ḡa_t²] gains α(1 − α)Σ̂ (centered) or (1 − α)Σ̂: a square_avg shifted by that/α
        nv = 0.3 * torch.rand(p.shape, generator=gen, dtype=DT) * p.grad**2 + 1e-6
        with_nv = update_model(opt, p, noise_var=nv)
        cp, copt = copied(params, opt)
        copt.state[cp[j]]["square_avg"] += ((1 - alpha) if centered else (1 - alpha) / alpha) * nv
        shifted = update_model(copt, cp[j])
        assert rel(with_nv.noise_scale, shifted.noise_scale) <= 1e-12
        assert rel(with_nv.mean_direction, shifted.direction) <= 1e-12


@settings(max_examples=15, deadline=None)
@given(lr_decay=st.sampled_from([0.0, 0.1]), wd=st.sampled_from([0.0, 0.1]), init=st.sampled_from([0.0, 0.5]),
       maximize=st.booleans(), foreach=st.booleans(), seed=st.integers(0, 99))
def test_adagrad_update_exact(lr_decay, wd, init, maximize, foreach, seed):
    params = make_params(seed)
    opt = groups(params, torch.optim.Adagrad, dict(lr=0.05, lr_decay=lr_decay, weight_decay=wd,
                                                   initial_accumulator_value=init),
                 dict(lr=0.01, initial_accumulator_value=init))
    for g in opt.param_groups:
        g["maximize"], g["foreach"] = maximize, foreach
    check_steps(params, opt, steps=4, seed=seed)


def test_adagrad_noise_scale_through_the_optimizer():
    params = make_params(13)
    opt = torch.optim.Adagrad(params, lr=0.05, lr_decay=0.1, weight_decay=0.05)
    gen = torch.Generator().manual_seed(14)
    for _ in range(3):
        set_grads(params, gen)
        opt.step()
    set_grads(params, gen)
    for j, p in enumerate(params):
        S_fd = state_fd_noise_scale(params, opt, j, [("sum", lambda g: 2 * (g + 0.05 * p.detach()))])
        assert rel(update_model(opt, p).noise_scale, S_fd) <= 1e-7


# --- realised increments ------------------------------------------------------------------


def cubic_residuals(theta, delta, decomp_fn, hs):
    d = decomp_fn(theta)
    inc = realised_increment(d, delta)
    s0 = torch.linalg.svdvals(theta)[0]
    return [float((torch.linalg.svdvals(theta + h * delta)[0] - s0 - h * inc.first - h * h * inc.half_curvature).abs())
            for h in hs], inc


DECOMPS = {"svd": lambda W: decompose(W, method="svd"), "fast": lambda W: decompose_layer(W, method="fast")}


@settings(max_examples=20, deadline=None)
@given(m=st.integers(2, 7), n=st.integers(2, 7), seed=st.integers(0, 10**6), route=st.sampled_from(sorted(DECOMPS)))
def test_realised_increment_cubic(m, n, seed, route):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(m, n, generator=gen, dtype=DT)
    s = torch.linalg.svdvals(theta)
    if (s[0] - s[1]) / s[0] < 0.05:
        theta = theta + 2.0 * s[0] * torch.outer(torch.linalg.svd(theta)[0][:, 0], torch.linalg.svd(theta)[2][0])
    delta = torch.randn(m, n, generator=gen, dtype=DT)
    s = torch.linalg.svdvals(theta)
    gap = float(s[0] - s[1]) if s.shape[0] > 1 else float(s[0])
    delta = delta / delta.norm() * 0.5 * gap  # the expansion's scale is ‖Δ‖/(σ1 − σ2)
    hs = [2.0**-k for k in range(2, 11)]
    res, inc = cubic_residuals(theta, delta, DECOMPS[route], hs)
    # ratios of residuals well above float64 rounding (σ1·1e-12): at the smallest h they are noise
    floor = 1e-12 * float(torch.linalg.svdvals(theta)[0])
    ratios = [res[i] / res[i + 1] for i in range(len(res) - 1) if res[i + 1] > floor]
    # cubic: halving h divides the residual by 8 once the quartic term has faded (by up to 16 before:
    # Hypothesis found m=4, n=3, seed=2195 where the last usable ratios are 10.6, 9.6, 8.9); a wrong
    # or missing second-order term leaves O(h²), a ratio of 4
    assert len(ratios) >= 4 and all(6.0 < r < 17.0 for r in ratios[-3:]), (ratios, res)
    # the second-order term is needed: without it the residual is O(h²)
    d0 = torch.linalg.svdvals(theta)[0]
    h = hs[-1]
    lin = float((torch.linalg.svdvals(theta + h * delta)[0] - d0 - h * inc.first).abs())
    assert res[-1] < 0.5 * lin or float(inc.half_curvature.abs()) < 1e-12
    assert inc.total == inc.first + inc.half_curvature


def test_realised_increment_gram_curvature_matches_svd_and_conv_kernel():
    from sdelip.rules.conv import ConvRule

    gen = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(4, 6, 3, groups=2).double()
    rule = ConvRule()
    theta = rule.matrix(conv.weight.detach())
    assert theta.shape == (6, 2 * 9)
    # a conv kernel's update, seen through the rule's matrix reshape
    dk = 0.05 * torch.randn(conv.weight.shape, generator=gen, dtype=DT)
    delta = rule.matrix(dk)
    fast = decompose_layer(theta, method="fast")
    assert isinstance(fast, GramCurvature)
    a = realised_increment(fast, delta)
    b = realised_increment(decompose(theta), delta)
    assert float((a.first - b.first).abs()) <= 1e-12 * float(b.first.abs()) + 1e-15
    assert float((a.half_curvature - b.half_curvature).abs()) <= 1e-10 * float(b.half_curvature.abs())
    hs = [2.0**-k for k in range(3, 10)]
    res, _ = cubic_residuals(theta, delta, DECOMPS["fast"], hs)
    ratios = [res[i] / res[i + 1] for i in range(len(res) - 1)]
    assert all(6.0 < r < 10.0 for r in ratios[-3:]), ratios
    # and the transposed orientation (tall θ: GramCurvature works on θᵀ)
    res_t, _ = cubic_residuals(theta.T.contiguous(), delta.T.contiguous(), DECOMPS["fast"], hs)
    assert all(6.0 < res_t[i] / res_t[i + 1] < 10.0 for i in range(len(res_t) - 4, len(res_t) - 1))


def test_realised_increment_of_an_adam_step_predicts_sigma1():
    """The increment of the update an optimizer applies (here AdamW) against σ1 before/after."""
    params = make_params(21)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(22)
    for _ in range(4):
        set_grads(params, gen)
        mdl = update_model(opt, params[0])
        theta = params[0].detach().clone()
        opt.step()
        inc = realised_increment(decompose(theta), mdl.update)
        real = torch.linalg.svdvals(params[0].detach())[0] - torch.linalg.svdvals(theta)[0]
        assert float((real - inc.total).abs()) <= 1e-3 * float(real.abs()) + 1e-9
        assert float((real - inc.first).abs()) > float((real - inc.total).abs())


def test_realised_increment_shape_error():
    d = decompose(torch.randn(3, 4, dtype=DT))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 4\)"):
        realised_increment(d, torch.randn(4, 3, dtype=DT))
