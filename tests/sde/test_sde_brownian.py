"""GridBrownian: torchsde's Brownian interface on a fixed grid, reproducible and long."""

from __future__ import annotations

import math

import pytest
import torch
import torchsde

from sdelip.sde import GridBrownian, ReducedLipschitzSDE, time_grid


def test_increments_reproducible_in_any_order_and_additive():
    a = GridBrownian(0.0, 0.01, (5, 3), seed=11, block_steps=7, dtype=torch.float64)
    b = GridBrownian(0.0, 0.01, (5, 3), seed=11, block_steps=7, dtype=torch.float64)
    fwd = [a(k * 0.01, (k + 1) * 0.01).clone() for k in range(30)]
    bwd = [b(k * 0.01, (k + 1) * 0.01).clone() for k in reversed(range(30))][::-1]
    for x, y in zip(fwd, bwd):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # A multi-step query is the sum of its steps; W(t) from t0; the block array matches.
    torch.testing.assert_close(a(0.03, 0.2), sum(fwd[3:20]))
    torch.testing.assert_close(a(0.2), sum(fwd[:20]))
    torch.testing.assert_close(a.increments(3, 20), torch.stack(fwd[3:20]))
    assert float(a(0.1, 0.1).abs().max()) == 0.0
    # Other streams and seeds are different paths.
    c = GridBrownian(0.0, 0.01, (5, 3), seed=11, stream=1, block_steps=7, dtype=torch.float64)
    assert not torch.equal(c(0.0, 0.01), fwd[0])


def test_increment_statistics():
    dt = 0.004
    bm = GridBrownian(1.0, dt, (2000, 4), seed=0, dtype=torch.float64)
    dW = bm.increments(0, 50)  # (50, 2000, 4): 400,000 N(0, dt) draws
    x = dW.reshape(-1) / math.sqrt(dt)
    n = x.numel()
    assert abs(float(x.mean())) < 4.5 / math.sqrt(n)
    assert abs(float(x.var()) - 1.0) < 4.5 * math.sqrt(2.0 / n)
    # Independent across steps and coordinates.
    corr = torch.corrcoef(torch.stack([dW[:-1].reshape(-1), dW[1:].reshape(-1)]))[0, 1]
    assert abs(float(corr)) < 4.5 / math.sqrt(dW[:-1].numel())


def test_off_grid_and_levy_area_are_refused():
    bm = GridBrownian(0.0, 0.1, (2, 2))
    with pytest.raises(ValueError, match="not on the Brownian grid"):
        bm(0.0, 0.15)
    with pytest.raises(ValueError, match="ta <= tb"):
        bm(0.2, 0.1)
    with pytest.raises(ValueError, match="euler"):
        bm(0.0, 0.1, return_U=True)
    bounded = GridBrownian(0.0, 0.1, (2, 2), n_steps=5)
    with pytest.raises(ValueError, match="outside the grid"):
        bounded(0.5, 0.6)
    assert bm.shape == (2, 2) and bm.levy_area_approximation == "none"


def test_time_grid_is_float64_and_ends_on_t1():
    ts = time_grid(39.0, 1e-3, every=1000)
    assert ts.dtype == torch.float64 and ts.numel() == 40 and float(ts[-1]) == pytest.approx(39.0)
    assert time_grid(1.0, 0.3).tolist() == pytest.approx([0.0, 0.3, 0.6, 0.9])
    ts = time_grid(1.0, 0.1, every=3)
    assert ts.tolist() == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0])


def test_sdeint_39000_steps_and_coarser_solver_step_on_the_same_path():
    """39,000 grid steps through torchsde.sdeint (the default BrownianInterval needs dt for this),
    and an sdeint step of 10 grid steps integrates the same Brownian path."""
    T, dt = 39_000, 1e-3
    sde = ReducedLipschitzSDE([0.0] * T, [0.0] * T, [1.0] * T, dt=dt, Z0=[0.0], include_ito_correction=False,
                              dtype=torch.float64)
    ts = time_grid(T * dt, dt, every=T)
    bm = GridBrownian(0.0, dt, (3, 1), seed=5, dtype=torch.float64)
    ys = torchsde.sdeint(sde, sde.initial_state(3), ts, bm=bm, dt=dt, method="euler")
    # Zero drift, unit diffusion: Z(T) − Z(0) is exactly W(T).
    torch.testing.assert_close(ys[-1], bm(0.0, T * dt))
    ys10 = torchsde.sdeint(sde, sde.initial_state(3), ts, bm=bm, dt=10 * dt, method="euler")
    torch.testing.assert_close(ys10[-1], ys[-1])
