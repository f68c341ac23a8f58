"""The reduced Z-system (from records) against Thm 17's closed forms, and the front end.

Statistical checks compare Monte Carlo moments of K(t) with Thm 17 (via
sdelip.lipschitz_moments, computed independently from the raw coefficients). With
piecewise-constant coefficients on the step grid, Euler is exact in law, so the only
error is sampling error: the tolerance is 4.5 standard errors estimated from the sample
(mean: s/√n; variance: sd((K − K̄)²)/√n). Seeds are fixed. The mutation tests remove κ,
the −½λ² correction or the diffusion and check that the same statistical check fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchsde
from hypothesis import given, settings
from hypothesis import strategies as st

from sdelip.core.formulas import lipschitz_moments
from sdelip.sde import GridBrownian, LipschitzSDE, ReducedLipschitzSDE, record_lr, simulate, simulate_record

from oracles import Z_SE, check_thm17, reduced_coefficients, synthetic_record


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread (tests/conftest.py)


def _simulate_K(sde: ReducedLipschitzSDE, n: int, seed: int) -> torch.Tensor:
    ts = sde.time_grid()
    bm = GridBrownian(sde.t0, sde.dt, (n, sde.brownian_size), seed=seed, dtype=torch.float64)
    ys = torchsde.sdeint(sde, sde.initial_state(n), ts, bm=bm, dt=sde.dt, method="euler")
    return sde.lipschitz(ys)  # (T + 1, n)


def _thm17(mu, kappa, lam2, K0, dt):
    return lipschitz_moments(K0, mu.sum(1), kappa.sum(1), lam2.sum(1), dt)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    L=st.integers(1, 3),
    T=st.integers(20, 120),
    dt=st.sampled_from([0.001, 0.01, 0.1]),
    varying=st.booleans(),
)
def test_reduced_matches_thm17(seed, L, T, dt, varying):
    mu, kappa, lam2 = reduced_coefficients(seed, T, L, dt, varying)
    K0 = np.random.default_rng(seed + 1).uniform(0.5, 3.0, size=L)
    sde = ReducedLipschitzSDE(mu, kappa, lam2, dt=dt, K0=K0, dtype=torch.float64)
    K = _simulate_K(sde, 20_000, seed)
    th = _thm17(mu, kappa, lam2, float(np.prod(K0)), dt)
    check_thm17(K, th.mean_K, th.var_K, at=(T // 2, -1))
    # The system's own closed form agrees with the independent one.
    m = sde.moments()
    np.testing.assert_allclose(m.mean_K, th.mean_K, rtol=1e-12)
    np.testing.assert_allclose(m.var_K, th.var_K, rtol=1e-12)


@pytest.mark.parametrize("varying", [False, True])
@pytest.mark.parametrize(
    "dropped", ["include_noise_curvature", "include_ito_correction", "include_diffusion"]
)
def test_reduced_check_goes_red_without_a_term(dropped, varying):
    """The Thm 17 check has the power to see κ, −½λ² and the diffusion: dropping one fails it."""
    T, L, dt, seed = 100, 2, 0.01, 7
    mu, kappa, lam2 = reduced_coefficients(seed, T, L, dt, varying)
    K0 = np.array([1.5, 0.8])
    th = _thm17(mu, kappa, lam2, float(np.prod(K0)), dt)
    good = ReducedLipschitzSDE(mu, kappa, lam2, dt=dt, K0=K0, dtype=torch.float64)
    check_thm17(_simulate_K(good, 20_000, seed), th.mean_K, th.var_K)
    bad = ReducedLipschitzSDE(mu, kappa, lam2, dt=dt, K0=K0, dtype=torch.float64, **{dropped: False})
    with pytest.raises(AssertionError):
        check_thm17(_simulate_K(bad, 20_000, seed), th.mean_K, th.var_K)
    # …while its own (switched) closed form still describes it.
    m = bad.moments()
    check_thm17(_simulate_K(bad, 20_000, seed), m.mean_K, m.var_K)


def test_from_record_tables_and_initial_state():
    df, names = synthetic_record(T=40, lr=0.01)
    sde = LipschitzSDE.from_record(df)
    assert isinstance(sde, ReducedLipschitzSDE)
    assert sde.layer_names == names and sde.n_steps == 40 and sde.dt == 0.01
    np.testing.assert_allclose(sde.z0.numpy(), np.log(df.loc[0, [f"K/{n}" for n in names]].to_numpy(float)), rtol=1e-6)
    mu = df[[f"drift/{n}" for n in names]].to_numpy()
    kappa = df[[f"noise_curvature/{n}" for n in names]].to_numpy()
    lam2 = df[[f"diffusion_sq/{n}" for n in names]].to_numpy()
    np.testing.assert_allclose(sde.log_drift.numpy(), mu + kappa - 0.5 * lam2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sde.diffusion.numpy(), np.sqrt(lam2), rtol=1e-5, atol=1e-6)
    # The drift at t is the coefficient of the step containing t (also off the grid, and at rounding).
    y = sde.initial_state(3)
    for k, t in ((0, 0.0), (5, 0.05), (5, 0.0549), (6, 0.06 - 1e-13), (39, 0.395)):
        np.testing.assert_allclose(sde.f(torch.tensor(t, dtype=torch.float64), y)[0].numpy(), sde.log_drift[k].numpy())
    with pytest.raises(ValueError, match="outside"):
        sde.f(torch.tensor(0.5), y)


def test_from_record_lr_sparse_network_and_switches():
    df, names = synthetic_record(T=50, lr=0.02, every=5, attrs=False)
    assert record_lr(df) == pytest.approx(0.02)  # inferred from t / step
    sde = ReducedLipschitzSDE.from_record(df)
    assert sde.n_steps == 46  # steps 0..45, each row holding until the next recorded step
    first = df[[f"drift/{n}" for n in names]].to_numpy()[0]
    np.testing.assert_allclose(sde.mu[4], first)
    np.testing.assert_allclose(sde.mu[5], df[[f"drift/{n}" for n in names]].to_numpy()[1])
    net = ReducedLipschitzSDE.from_record(df, per_layer=False)
    assert net.n_layers == 1 and net.layer_names == ["Z"]
    np.testing.assert_allclose(net.mu[:, 0], sde.mu.sum(1))
    np.testing.assert_allclose(net.Z0, [sde.Z0.sum()])
    df.attrs["metadata"] = {"lr": 0.5}
    assert record_lr(df) == 0.5
    df["lr"] = 0.02  # load_record's per-step column wins
    assert record_lr(df) == 0.02
    varying = df.copy()
    varying.loc[2, "lr"] = 0.03
    with pytest.raises(NotImplementedError, match="varies"):
        record_lr(varying)
    sub = ReducedLipschitzSDE.from_record(df, layers=names[:1], include_noise_curvature=False, include_diffusion=False)
    np.testing.assert_allclose(sub.log_drift.numpy()[:, 0], sub.mu[:, 0] - 0.5 * sub.lam2[:, 0], rtol=1e-5, atol=1e-6)
    assert float(sub.diffusion.abs().max()) == 0.0
    bad = df.copy()
    bad.loc[3, f"drift/{names[0]}"] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ReducedLipschitzSDE.from_record(bad)
    with pytest.raises(ValueError, match="lacks columns"):
        ReducedLipschitzSDE.from_record(df.drop(columns=[f"K/{names[1]}"]))


def test_simulate_record_front_end():
    df, names = synthetic_record(T=200, L=3, lr=0.01)
    res = simulate_record(df, n=4000, every=20, seed=3, progress=False, chunk_size=1500, keep_paths=True)
    assert res.n == 4000 and res.chunk_size == 1500
    assert res.t.shape == (11,) and res.paths.shape == (11, 4000)
    assert res.quantiles.shape == (3, 11)
    assert np.all(res.quantiles[0] <= res.quantiles[1]) and np.all(res.quantiles[1] <= res.quantiles[2])
    np.testing.assert_allclose(res.mean_K, res.paths.astype(np.float64).mean(1), rtol=1e-5)
    np.testing.assert_allclose(res.var_K, res.paths.astype(np.float64).var(1, ddof=1), rtol=1e-4)
    np.testing.assert_allclose(res.mean_K[0], df["K"].iloc[0], rtol=1e-5)
    # Thm 17 at the saved times, and agreement within sampling error at the end.
    assert res.theory is not None and res.theory.mean_K.shape == (11,)
    se = math.sqrt(res.var_K[-1] / res.n)
    assert abs(res.mean_K[-1] - res.theory.mean_K[-1]) <= Z_SE * se
    frame = res.to_frame()
    assert list(frame.columns[:6]) == ["t", "mean_K", "var_K", "std_K", "mean_Z", "var_Z"]
    assert {"q0.025", "q0.5", "q0.975", "theory_mean_K", "theory_var_K"} <= set(frame.columns)
    # Reproducible for a given (seed, chunk_size); another seed differs.
    again = simulate_record(df, n=4000, every=20, seed=3, progress=False, chunk_size=1500)
    np.testing.assert_array_equal(again.mean_K, res.mean_K)
    other = simulate_record(df, n=4000, every=20, seed=4, progress=False, chunk_size=1500)
    assert not np.array_equal(other.mean_K, res.mean_K)


def test_simulate_long_horizon_39000_steps():
    """The paper's run length: 39,000 Euler steps through sdeint with the grid Brownian motion."""
    T, lr = 39_000, 1e-3
    mu = np.full((T, 2), 0.2)
    kappa = np.full((T, 2), 0.05)
    lam2 = np.full((T, 2), 0.01)
    sde = ReducedLipschitzSDE(mu, kappa, lam2, dt=lr, K0=[1.0, 2.0])
    res = simulate(sde, 64, sde.time_grid(every=3900), progress=False, quantiles=())
    assert res.t[-1] == pytest.approx(39.0) and np.all(np.isfinite(res.mean_K))
    assert res.theory.mean_K[-1] == pytest.approx(2.0 * math.exp(39.0 * 2 * 0.25))


def test_simulate_errors():
    sde = ReducedLipschitzSDE(np.zeros(10), np.zeros(10), np.ones(10), dt=0.1, K0=[1.0])
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            simulate(sde, 10, sde.time_grid(), device="cuda")
    with pytest.raises(ValueError, match="grid"):
        simulate(sde, 10, [0.0, 0.05, 0.3], progress=False)
    with pytest.raises(ValueError, match="n >= 2"):
        simulate(sde, 1, sde.time_grid(), progress=False)
    with pytest.raises(TypeError, match="exactly one"):
        ReducedLipschitzSDE(np.zeros(10), np.zeros(10), np.ones(10), dt=0.1)
    with pytest.raises(ValueError, match="non-negative"):
        ReducedLipschitzSDE(np.zeros(10), np.zeros(10), -np.ones(10), dt=0.1, K0=[1.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_simulate_cuda_matches_cpu_statistically():
    df, _ = synthetic_record(T=100, lr=0.01)
    cpu = simulate_record(df, n=20_000, every=10, progress=False)
    gpu = simulate_record(df, n=20_000, every=10, progress=False, device="cuda")
    assert gpu.device.startswith("cuda")
    se = np.sqrt(cpu.var_K / cpu.n + gpu.var_K / gpu.n)
    assert np.all(np.abs(cpu.mean_K - gpu.mean_K) <= Z_SE * se + 1e-6)
