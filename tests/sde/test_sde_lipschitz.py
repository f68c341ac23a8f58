"""LipschitzSDE (Def 10): the coupled [θ, log K^(ℓ)] system and the pathwise Itô test.

Pathwise check: one sdeint call integrates θ (Def 4) and log K^(ℓ) (Thm 14 + Itô for
log) on the same Brownian increments; log K_Itô(t) − log σ1(θ(t)) is then an Euler
discretisation error, a martingale-like sum of O(dt) per-step errors: its typical size
shrinks like √dt (strong order ½), and its mean is zero up to sampling error.
The test (tiny tanh MLP, η = 1, M = 4, t = 2, n = 128 trajectories, float64) asks that
the median absolute discrepancy at dt = η/80 be below 0.7 × that at dt = η/20 (√¼ = 0.5
expected; the median because a trajectory passing near a small spectral gap gives
heavy tails), and that the mean discrepancy of every layer be within 4 standard errors
(sd/√n) of zero at dt = η/80. Removing κ or
the −½‖λ‖² correction biases the mean by −∫κ or +½∫‖λ‖², far beyond that (tested).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchsde
from torch import nn

from sdelip import layer_terms, weight_matrix
from sdelip.sde import DataSource, DenseDiffusion, GridBrownian, LipschitzSDE, simulate, time_grid

Z_SE = 4.0


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread (tests/conftest.py)


def _data(N=128, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=gen, dtype=torch.float64), torch.randint(0, 2, (N,), generator=gen)


def _reference_estimate(sde, X, Y, Xb, Yb, y):
    """Autograd one sample at a time: per trajectory, ∇L on (X, Y) and the per-sample gradients of (Xb[i], Yb[i])."""
    grads, per = {}, {}
    for i in range(y.shape[0]):
        params = {k: v.clone().requires_grad_(True) for k, v in sde.params(y[i]).items()}
        names = list(params)

        def grad_of(x, t):
            out = torch.func.functional_call(sde.model, params, (x,))
            return dict(zip(names, torch.autograd.grad(nn.functional.cross_entropy(out, t), list(params.values()))))

        g = grad_of(X, Y)
        rows = [grad_of(Xb[i, j : j + 1], Yb[i, j : j + 1]) for j in range(Xb.shape[1])]
        for k in names:
            grads.setdefault(k, []).append(g[k])
            per.setdefault(k, []).append(torch.stack([r[k] for r in rows]))
    return {k: torch.stack(v) for k, v in grads.items()}, {k: torch.stack(v) for k, v in per.items()}


@pytest.mark.parametrize("engine", ["factored", "materialised"])
@pytest.mark.parametrize("conv", [False, True])
def test_terms_match_layer_terms_and_share_the_parameter_noise(conv, engine):
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
        gen = torch.Generator().manual_seed(1)
        X, Y = torch.randn(40, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 2, (40,), generator=gen)
    else:
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        X, Y = _data(40)
    eta, M, n = 0.2, 5, 3
    sde = LipschitzSDE(model, (X, Y), lr=eta, noise_batch_size=M, seed=7, engine=engine)
    y = sde.initial_state(n)
    y[:, : sde.n_params] += 0.05 * torch.randn(n, sde.n_params, dtype=torch.float64)
    terms = sde.terms(0.0, y)
    g = DenseDiffusion(sde).g(0.0, y)
    assert sde.n_evaluations == 1
    Xb, Yb = DataSource((X, Y), seed=7).sample(M, n)  # the drift uses the full set: the noise batch is the first draw
    grads, per = _reference_estimate(sde, X, Y, Xb, Yb, y)
    P = sde.n_params
    for l, (layer, wname) in enumerate(zip(sde.layers, sde.layout.weight_names)):
        spec = sde.layout[wname]
        b = sde.layout.blocks.index(next(bl for bl in sde.layout.blocks if bl.layer == l))
        for i in range(n):
            W = weight_matrix(sde.params(y[i])[wname])
            G = per[wname][i].reshape(M, *W.shape)
            ref = layer_terms(W, G, eta, grad=grads[wname][i].reshape(W.shape), split=False)
            torch.testing.assert_close(terms["sigma1"][i, l], ref.sigma1)
            torch.testing.assert_close(terms["drift"][i, l], ref.drift)
            torch.testing.assert_close(terms["noise_curvature"][i, l], ref.noise_curvature)
            torch.testing.assert_close(terms["diffusion_sq"][i, l], ref.diffusion_sq)
            lam = g[i, P + l]
            cols = slice(b * M, (b + 1) * M)
            # ‖λ‖² of Thm 14, on the layer's own Brownian block only.
            torch.testing.assert_close((lam * lam).sum(), ref.diffusion_sq)
            assert float(lam[: b * M].abs().sum() + lam[(b + 1) * M:].abs().sum()) == 0.0
            # λ = Jᵀ (√η Ωᵀ/√M) / σ1: the same increments as the layer's weights.
            U, S, Vh = torch.linalg.svd(W)
            Gw = g[i, spec.start:spec.stop, cols].mT.reshape(M, *W.shape)  # each column as a weight direction
            torch.testing.assert_close(lam[cols], torch.einsum("a,Mab,b->M", U[:, 0], Gw, Vh[0]) / S[0])
    # The log K drift is μ + κ − ½‖λ‖².
    f = sde.f(0.0, y)[:, P:]
    torch.testing.assert_close(f, terms["drift"] + terms["noise_curvature"] - 0.5 * terms["diffusion_sq"])
    # g·v by the engine equals the dense g times v.
    v = torch.randn(n, sde.brownian_size, dtype=torch.float64)
    torch.testing.assert_close(sde.g_prod(0.0, y, v), torch.einsum("nij,nj->ni", g, v))


def _pathwise(dt, n=128, **switches):
    """log K_Itô − log σ1(θ) at t = 2 per trajectory and layer, (n, L)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    sde = LipschitzSDE(model, _data(), lr=1.0, noise_batch_size=4, seed=1, **switches)
    ts = time_grid(2.0, dt, every=int(round(2.0 / dt)))
    bm = GridBrownian(0.0, dt, (n, sde.brownian_size), seed=3, dtype=torch.float64)
    ys = torchsde.sdeint(sde, sde.initial_state(n, dtype=torch.float64), ts, bm=bm, dt=dt, method="euler")
    assert ys.shape == (2, n, sde.state_size)
    return (sde.log_lipschitz(ys, per_layer=True) - sde.direct_lipschitz(ys, per_layer=True).log())[-1]


def check_unbiased(d: torch.Tensor) -> None:
    n = d.shape[0]
    z = d.mean(0) / (d.std(0) / math.sqrt(n))
    assert bool((z.abs() <= Z_SE).all()), f"mean discrepancy log K_Itô − log σ1(θ) per layer: {z.tolist()} s.e."


@pytest.fixture(scope="module")
def fine():
    return _pathwise(0.0125)


@pytest.mark.slow
def test_pathwise_ito_consistency(fine):
    coarse = _pathwise(0.05)
    # The median |discrepancy| (robust to the odd trajectory passing near a small
    # spectral gap) halves when dt is divided by 4, as strong order ½ predicts.
    med = lambda d: d.abs().median(0).values  # noqa: E731
    assert bool((med(fine) < 0.7 * med(coarse)).all()), (med(coarse).tolist(), med(fine).tolist())
    check_unbiased(fine)
    assert float(med(fine).max()) < 0.01  # and small in absolute terms (log K moves by ~0.5 here)


@pytest.mark.slow
@pytest.mark.parametrize("dropped", ["include_noise_curvature", "include_ito_correction"])
def test_pathwise_check_goes_red_without_a_term(dropped, fine):
    check_unbiased(fine)
    with pytest.raises(AssertionError, match="mean discrepancy"):
        check_unbiased(_pathwise(0.0125, **{dropped: False}))


def test_simulate_front_end_with_lipschitz_sde():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    X, Y = _data(64)
    sde = LipschitzSDE(model, (X.float(), Y), lr=0.1, noise_batch_size=8)
    res = simulate(sde, 16, time_grid(1.0, 0.1, every=2), progress=False, keep_paths=True)
    assert res.paths.shape == (6, 16) and np.all(np.isfinite(res.paths))
    K0 = float(sde.direct_lipschitz(sde.initial_state(1))[0])
    np.testing.assert_allclose(res.mean_K[0], K0, rtol=1e-6)
    assert np.all(res.var_K[1:] > 0)


@pytest.mark.slow
@pytest.mark.parametrize("mutation", ["kappa", "half_lambda_sq"])
def test_pathwise_check_goes_red_when_a_term_is_lost_in_the_code(mutation, monkeypatch):
    """A bug that loses κ, or the ½ of the Itô correction, in the term computation is caught."""
    import attrs

    from sdelip.sde import lipschitz_sde

    orig = lipschitz_sde.terms_from_projections

    def mutated(*args, **kwargs):
        t = orig(*args, **kwargs)
        if mutation == "kappa":
            return attrs.evolve(t, noise_curvature=torch.zeros_like(t.noise_curvature))
        return attrs.evolve(t, diffusion_sq=0.0 * t.diffusion_sq)  # the −½‖λ‖² correction disappears; λ stays

    monkeypatch.setattr(lipschitz_sde, "terms_from_projections", mutated)
    with pytest.raises(AssertionError, match="mean discrepancy"):
        check_unbiased(_pathwise(0.0125))


def _deterministic_step(eta: float, step_curvature: bool, seed: int = 0):
    """One Euler step dt = η without noise (identical per-sample gradients) of a single layer."""
    from sdelip.sde import GradientEstimate

    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    grad = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    model = nn.Linear(6, 4, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(W)
    M = 3
    fn = lambda p: GradientEstimate(grad={"weight": grad[None]}, per_sample={"weight": grad.expand(1, M, 4, 6)})  # noqa: E731
    sde = LipschitzSDE(model, lr=eta, gradient_fn=fn, noise_batch_size=M, include_step_curvature=step_curvature)
    y0 = sde.initial_state(1)
    f, _ = sde.f_and_g_prod(0.0, y0, torch.zeros(1, sde.brownian_size, dtype=torch.float64))
    y1 = y0 + f * eta
    ito = float(sde.log_lipschitz(y1) - sde.log_lipschitz(y0))
    direct = float(sde.direct_lipschitz(y1).log() - sde.direct_lipschitz(y0).log())
    terms = sde.terms(0.0, y0)
    return ito - direct, W, grad, terms


def test_step_curvature_is_the_discrete_step_drift():
    """log σ1(θ − ηg) = log σ1 + ημ + ½η²(gᵀHg/σ1 − μ²) + O(η³): with the step curvature
    (η/2σ1)gᵀHg in the drift, the Itô step misses only ½η²μ²; without it, ½η²(gᵀHg/σ1 − μ²)."""
    from sdelip import opnorm_hessian
    from sdelip.core.spectral import vec

    eta = 1e-3
    gap_sc, W, grad, terms = _deterministic_step(eta, True)
    gap_plain, _, _, _ = _deterministic_step(eta, False)
    s1 = torch.linalg.svdvals(W)[0]
    H = opnorm_hessian(W)
    gHg = float(vec(grad) @ H @ vec(grad))
    mu = float(terms["drift"][0, 0])
    torch.testing.assert_close(terms["step_curvature"][0, 0], eta / (2 * s1) * gHg)
    # O(η) remainders: 0.7 % here at η = 1e-3; the two expectations differ by 6×.
    expected_sc, expected_plain = 0.5 * mu**2, -0.5 * (gHg / float(s1) - mu**2)
    assert abs(gap_sc / eta**2 - expected_sc) < 0.03 * abs(expected_sc), (gap_sc / eta**2, expected_sc)
    assert abs(gap_plain / eta**2 - expected_plain) < 0.03 * abs(expected_plain), (gap_plain / eta**2, expected_plain)
    assert abs(gHg / float(s1)) > 4 * mu**2  # the term is worth testing here


@pytest.mark.parametrize("decomposition", ["svd", "fast"])
def test_step_curvature_matches_the_dense_hessian_on_a_model(decomposition):
    from sdelip import opnorm_hessian
    from sdelip.core.spectral import vec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, Y = _data(60)
    kw = dict(lr=0.3, noise_batch_size=5, seed=2, decomposition=decomposition)
    sde = LipschitzSDE(model, (X, Y), include_step_curvature=True, **kw)
    plain = LipschitzSDE(model, (X, Y), **kw)
    y = sde.initial_state(2)
    y[:, : sde.n_params] += 0.05 * torch.randn(2, sde.n_params, dtype=torch.float64)
    terms = sde.terms(0.0, y)
    grads, _ = _reference_estimate(sde, X, Y, X[None, :1].expand(2, 1, 3), Y[None, :1].expand(2, 1), y)
    for l, wname in enumerate(sde.layout.weight_names):
        for i in range(2):
            W = weight_matrix(sde.params(y[i])[wname])
            g = grads[wname][i].reshape(W.shape)
            ref = 0.3 / (2 * torch.linalg.svdvals(W)[0]) * (vec(g) @ opnorm_hessian(W) @ vec(g))
            torch.testing.assert_close(terms["step_curvature"][i, l], ref)
    # and it is added to the log K drift, nothing else changes
    P = sde.n_params
    torch.testing.assert_close(sde.f(0.0, y)[:, P:] - plain.f(0.0, y)[:, P:], terms["step_curvature"])


def test_integrated_terms_recover_log_k_without_the_step_curvature():
    """integrate=("step_curvature",): log K with the step drift minus its integral is the plain log K."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = _data(64)
    dt, n = 0.2, 6
    ts = time_grid(1.0, dt)

    def run(**kw):
        sde = LipschitzSDE(model, data, lr=dt, noise_batch_size=4, seed=3, **kw)
        bm = GridBrownian(0.0, dt, (n, sde.brownian_size), seed=1, dtype=torch.float64)
        return sde, torchsde.sdeint(sde, sde.initial_state(n), ts, bm=bm, dt=dt, method="euler")

    sde, ys = run(include_step_curvature=True, integrate=("step_curvature", "noise_curvature"))
    plain, ys_plain = run()
    assert sde.state_size == plain.state_size + 2 * sde.n_layers
    sc = sde.integrated(ys, "step_curvature")
    assert float(sc[-1].abs().min()) > 0
    torch.testing.assert_close(sde.log_lipschitz(ys, per_layer=True) - sc, plain.log_lipschitz(ys_plain, per_layer=True))
    torch.testing.assert_close(sde.direct_lipschitz(ys), plain.direct_lipschitz(ys_plain))  # θ does not see it
    assert bool((sde.integrated(ys, "noise_curvature", per_layer=False)[1:] > 0).all())  # κ ≥ 0
    with pytest.raises(KeyError, match="integrate"):
        plain.integrated(ys_plain, "step_curvature")
    with pytest.raises(ValueError, match="integrate takes"):
        LipschitzSDE(model, data, lr=dt, noise_batch_size=4, integrate=("sigma2",))
