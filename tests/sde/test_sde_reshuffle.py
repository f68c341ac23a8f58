"""The parameter SDE of reshuffled SGD (sampling="reshuffle"): engine agreement and moments against real batches.

The reference is a Monte Carlo of real reshuffled mini-batches at the same θ (random
permutations, batches of M without replacement), with per-sample gradients from
autograd, and the closed forms of docs/theory.md §10:
Cov ξ_j = (1/M)(N − M)/(N − 1) Σ_N, Cov(ξ_j, ξ_k) = −Σ_N/(N − 1), zero epoch sum.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchsde
from torch import nn
from torch.func import functional_call, grad, vmap

from sdelip.sde import DenseDiffusion, EpochBrownian, GridBrownian, LipschitzSDE, ParameterSDE, simulate, time_grid
from sdelip.sde.noise.reshuffle import reshuffle_moments

N, M, LR = 12, 3, 0.1
S = N // M


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 3, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 2, (N,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, X, Y


def _per_sample(model, X, Y):
    """Per-sample gradients (N, P) at the model's parameters, autograd one sample at a time."""
    rows = []
    for i in range(N):
        model.zero_grad()
        nn.functional.cross_entropy(model(X[i : i + 1]), Y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def test_factored_pass_equals_per_sample_gradients_and_dense_g():
    model, X, Y = _problem()
    fac = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle")
    mat = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle", engine="materialised")
    assert fac.brownian_size == N and fac.steps_per_epoch == S and fac.noise_coupling == "shared"
    n = 5
    y = fac.initial_state(n) + 0.1 * torch.randn(n, fac.state_size, dtype=torch.float64)
    v = torch.randn(n, N, dtype=torch.float64)
    f1, g1 = fac.f_and_g_prod(0.0, y, v)
    f2, g2 = mat.f_and_g_prod(0.0, y, v)
    torch.testing.assert_close(f1, f2, rtol=0, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.einsum("nps,ns->np", DenseDiffusion(mat).g(0.0, y), v), g1, rtol=0, atol=1e-12)
    # f then g_prod separately (two passes) gives the same as the joint pass.
    fac2 = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle")
    torch.testing.assert_close(fac2.f(0.0, y), f1, rtol=0, atol=1e-12)
    torch.testing.assert_close(fac2.g_prod(0.0, y, v), g1, rtol=0, atol=1e-12)
    # Against autograd at trajectory 0: drift −∇L, G = D/√(M(N − 1)) scaled by √η.
    P = fac.n_params
    with torch.no_grad():
        for p, w in zip(model.parameters(), fac.layout.unflatten(y[0])):
            p.copy_(fac.layout.unflatten(y[0])[w])
    D = _per_sample(model, X, Y)
    torch.testing.assert_close(f1[0], -D.mean(0), rtol=0, atol=1e-12)
    G = (D - D.mean(0)).T * math.sqrt(LR / (M * (N - 1)))
    torch.testing.assert_close(g1[0], G @ v[0], rtol=0, atol=1e-12)
    assert P == G.shape[0]


def test_invalid_reshuffle_options_are_refused():
    model, X, Y = _problem()
    with pytest.raises(ValueError, match="grad_source"):
        ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle", grad_source="batch")
    with pytest.raises(NotImplementedError, match="noise_coupling='shared'"):
        ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle", noise_coupling="layers")
    with pytest.raises(NotImplementedError, match="direct_lipschitz"):
        LipschitzSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle")
    with pytest.raises(ValueError, match="sampling must be"):
        ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="epochs")
    iid = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M)
    assert iid.noise_coupling == "layers" and iid.sampling == "iid" and isinstance(iid.brownian_motion(2), GridBrownian)
    sde = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle")
    bm = sde.brownian_motion(2)
    assert isinstance(bm, EpochBrownian) and bm.steps_per_epoch == S and bm.batch_fraction == pytest.approx(M / N)


def _real_reshuffled_noise(D, n, gen):
    """−η(ḡ_{B_j} − ∇L) of the S steps of n random epochs at fixed θ: (S, n, P)."""
    perms = torch.stack([torch.randperm(N, generator=gen) for _ in range(n)])  # (n, N)
    Dc = D - D.mean(0)
    return torch.stack([-LR * Dc[perms[:, j * M : (j + 1) * M]].mean(1) for j in range(S)])


def _step_stats(I, u):
    """Per-step variance, cross-step covariance (pooled) and epoch-sum variance of u·I, with standard errors."""
    a = I @ u  # (S, n)
    n = a.shape[1]
    sq = a.pow(2)
    var = sq.mean()
    var_se = sq.mean(0).std() / math.sqrt(n)
    cross_terms = torch.stack([a[j] * a[k] for j in range(S) for k in range(S) if j != k]).mean(0)
    cross = cross_terms.mean()
    cross_se = cross_terms.std() / math.sqrt(n)
    return float(var), float(var_se), float(cross), float(cross_se), float(a.sum(0).pow(2).mean())


def test_one_step_and_cross_step_moments_at_fixed_theta_match_real_reshuffled_batches():
    model, X, Y = _problem(1)
    D = _per_sample(model, X, Y)
    Sigma = torch.cov(D.T, correction=0)  # Σ_N
    mom = reshuffle_moments(N, M)
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    real = _real_reshuffled_noise(D, n, gen)
    dirs = torch.randn(3, D.shape[1], generator=gen, dtype=torch.float64)
    dirs[0] = torch.linalg.eigh(Sigma)[1][:, -1]  # the top direction of the noise

    sde = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle")
    y = sde.initial_state(n)
    bm = sde.brownian_motion(n, seed=3, dtype=torch.float64)
    pinned = torch.stack([sde.g_prod(k * LR, y, bm.increment(k)) for k in range(S)])  # (S, n, P)
    iid = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, noise_coupling="shared", seed=5)
    gbm = GridBrownian(0.0, LR, (n, iid.brownian_size), seed=3, dtype=torch.float64)
    indep = torch.stack([iid.g_prod(k * LR, y, gbm.increment(k)) for k in range(S)])
    for u in dirs:
        s2 = float(u @ Sigma @ u) * LR**2
        exact_var, exact_cross = mom["step"] * s2, mom["cross"] * s2
        for name, I in (("real", real), ("reshuffle SDE", pinned)):
            var, var_se, cross, cross_se, esum = _step_stats(I, u)
            assert abs(var - exact_var) < 4.5 * var_se, (name, var, exact_var, var_se)
            assert abs(cross - exact_cross) < 4.5 * cross_se, (name, cross, exact_cross, cross_se)
            assert esum < 1e-20 * max(1.0, s2), (name, esum)  # the epoch's noise cancels exactly (S·M = N)
        # The iid SDE misses all three: no finite-population factor, no negative cross-step
        # covariance, an epoch sum of variance S·η²Σ_N/M.
        var, var_se, cross, cross_se, esum = _step_stats(indep, u)
        assert abs(cross - exact_cross) > 10 * cross_se
        assert abs(var - exact_var) > 4.5 * var_se
        assert esum > 0.5 * S * s2 / M
    # The finite-population factor itself is a test of the algebra: (N − M)/(N − 1) = 9/11 here.
    assert mom["step"] * M == pytest.approx((N - M) / (N - 1)) and mom["epoch_sum"] == pytest.approx(0.0, abs=1e-15)


def _real_sgd_epoch(model, X, Y, n, steps, gen):
    """θ after ``steps`` steps of n independent reshuffled-SGD runs from the model's θ: (n, P)."""
    names = [k for k, _ in model.named_parameters()]
    p0 = {k: v.detach() for k, v in model.named_parameters()}
    params = {k: v.unsqueeze(0).repeat(n, *([1] * v.ndim)) for k, v in p0.items()}

    def loss(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    step_grad = vmap(grad(loss))
    perms = torch.stack([torch.randperm(N, generator=gen) for _ in range(n)])
    for j in range(steps):
        idx = perms[:, j * M : (j + 1) * M]
        g = step_grad(params, X[idx], Y[idx])
        params = {k: params[k] - LR * g[k] for k in names}
    return torch.cat([params[k].reshape(n, -1) for k in names], 1)


def test_half_epoch_and_one_epoch_spread_of_theta_against_real_reshuffled_sgd():
    """θ moves: after half an epoch the spread matches real SGD; after one the noise has (almost) cancelled.

    The iid SDE's spread after one epoch is S·η²Σ/M; real reshuffled SGD and the epoch SDE
    keep only the O(η³) remainder of θ moving within the epoch.
    """
    model, X, Y = _problem(2)
    n = 6_000
    gen = torch.Generator().manual_seed(1)
    dirs = torch.randn(3, sum(p.numel() for p in model.parameters()), generator=gen, dtype=torch.float64)
    sde = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle")
    iid = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, noise_coupling="shared", seed=2)
    y0 = sde.initial_state(n)
    ts = time_grid(S * LR, LR)
    with torch.no_grad():
        ys = torchsde.sdeint(sde, y0, ts, bm=sde.brownian_motion(n, seed=4, dtype=torch.float64), dt=LR,
                             method="euler")
        yi = torchsde.sdeint(iid, y0, ts, bm=iid.brownian_motion(n, seed=4, dtype=torch.float64), dt=LR,
                             method="euler")
    half = S // 2
    real_half = _real_sgd_epoch(model, X, Y, n, half, gen)
    real_end = _real_sgd_epoch(model, X, Y, n, S, gen)
    for u in dirs:
        v_real, v_sde = float((real_half @ u).var()), float((ys[half] @ u).var())
        se = math.sqrt(2 / n) * (v_real + v_sde)
        assert abs(v_real - v_sde) < 4.5 * se + 0.05 * v_real, (v_real, v_sde)
        # Mean after half an epoch: both follow the full-set drift to O(η²).
        assert float(((real_half - ys[half]).mean(0) @ u).abs()) < 4.5 * math.sqrt((v_real + v_sde) / n) + 0.02 * math.sqrt(v_real)
        e_real, e_sde, e_iid = float((real_end @ u).var()), float((ys[S] @ u).var()), float((yi[S] @ u).var())
        assert e_real < 0.1 * e_iid and e_sde < 0.1 * e_iid, (e_real, e_sde, e_iid)
        assert 0.5 < e_sde / e_real < 2, (e_real, e_sde)  # measured 1.10–1.19


def test_simulate_drives_the_reshuffled_system_with_the_epoch_driver():
    model, X, Y = _problem(3)
    sde = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle")
    res = simulate(sde, n=8, ts=time_grid(2 * S * LR, LR, every=S), seed=0, progress=False, dtype=torch.float64)
    assert res.var_K[1] > 0 and res.n == 8
    again = simulate(sde, n=8, ts=time_grid(2 * S * LR, LR, every=S), seed=0, progress=False, dtype=torch.float64)
    assert list(res.mean_K) == list(again.mean_K)


def test_a_permutation_driver_turns_the_euler_step_into_a_real_reshuffled_sgd_step():
    """With ΔW_i = −√(η(N − 1)/M)(1[i ∈ B] − M/N) — the permutation's own indicators, whose image G·ΔW has the
    same mean and second moments (within and across steps) as that of the epoch-pinned Gaussian driver, because
    G's columns sum to zero — the Euler step θ + η f + g·ΔW is exactly θ − η ḡ_B(θ): at dt = η the epoch SDE
    differs from real reshuffled SGD only in replacing that driver by a Gaussian one."""
    model, X, Y = _problem(4)
    sde = ParameterSDE(model, (X, Y), lr=LR, noise_batch_size=M, sampling="reshuffle")
    n = 3
    y = sde.initial_state(n) + 0.2 * torch.randn(n, sde.state_size, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(N, generator=gen)
    for j in range(S):
        batch = perm[j * M : (j + 1) * M]
        a = torch.zeros(N, dtype=torch.float64)
        a[batch] = 1.0
        v = (-math.sqrt(LR * (N - 1) / M) * (a - M / N)).expand(n, N)
        f, gv = sde.f_and_g_prod(j * LR, y, v)
        step = LR * f + gv
        names = [k for k, _ in model.named_parameters()]
        params = {k: t for k, t in sde.layout.unflatten(y).items()}

        def loss(p):
            return nn.functional.cross_entropy(functional_call(model, p, (X[batch],)), Y[batch])

        g = vmap(grad(loss))(params)
        expect = -LR * torch.cat([g[k].reshape(n, -1) for k in names], 1)
        torch.testing.assert_close(step, expect, rtol=0, atol=1e-12)
