"""EpochBrownian: the epoch-pinned driver of reshuffled SGD's noise (docs/theory.md §10)."""

from __future__ import annotations

import math

import pytest
import torch
import torchsde
from hypothesis import given, settings
from hypothesis import strategies as st

from sdelip.sde import EpochBrownian, GridBrownian, time_grid


def _cov_over_coordinates(bm, k0, k1):
    """Increments of steps k0..k1−1 / √dt as (steps, coordinates) and their second-moment matrix."""
    X = bm.increments(k0, k1).reshape(k1 - k0, -1).double() / math.sqrt(bm.dt)
    return X, X @ X.T / X.shape[1]


@settings(max_examples=8, deadline=None, derandomize=True)
@given(S=st.integers(2, 7), M=st.integers(1, 5), rem=st.integers(0, 4), dt=st.floats(1e-3, 0.5), seed=st.integers(0, 99))
def test_moments_within_and_across_epochs(S, M, rem, dt, seed):
    rem = rem % M if M > 1 else 0
    N = S * M + rem  # S = ⌊N/M⌋ steps per epoch, the remainder dropped
    alpha = M / N
    n = 20_000
    bm = EpochBrownian(0.0, dt, (n,), steps_per_epoch=S, batch_fraction=alpha, seed=seed, dtype=torch.float64,
                       block_steps=3)
    X, C = _cov_over_coordinates(bm, 0, 2 * S)  # two epochs
    expect = torch.zeros(2 * S, 2 * S, dtype=torch.float64)
    for e in range(2):
        sl = slice(e * S, (e + 1) * S)
        expect[sl, sl] = torch.eye(S, dtype=torch.float64) - alpha
    se = math.sqrt(2.0 / n)  # sd of one entry of C (Gaussian, |C_jk| <= 1)
    assert float((C - expect).abs().max()) < 5 * se, (C - expect).abs().max()
    # Per step Var = dt(1 − α), within an epoch Cov = −α dt, across epochs 0 (checked entrywise above); the
    # epoch sum is exactly zero when the epoch uses every sample and has variance S(1 − αS) dt otherwise.
    sums = X[:S].sum(0)
    if rem == 0:
        assert float(sums.abs().max()) < 1e-9
    else:
        v = float(sums.var())
        assert abs(v - S * (1 - alpha * S)) < 5 * math.sqrt(2.0 / n) * S * (1 - alpha * S)
    # Mean zero.
    assert float(X.mean(1).abs().max()) < 5 / math.sqrt(n)


def test_bridge_is_the_default_and_the_iid_grid_is_not_pinned():
    S = 5
    bm = EpochBrownian(0.0, 0.1, (3, 4), steps_per_epoch=S, seed=3, dtype=torch.float64)
    assert bm.batch_fraction == pytest.approx(1 / S) and bm.gamma == pytest.approx(1 / S)
    for e in range(3):
        total = bm(e * S * 0.1, (e + 1) * S * 0.1)
        assert float(total.abs().max()) < 1e-12
    grid = GridBrownian(0.0, 0.1, (3, 4), seed=3, dtype=torch.float64)
    assert float(grid(0.0, S * 0.1).abs().max()) > 1e-3


def test_reproducible_in_any_order_across_streams_and_seeds():
    kw = dict(steps_per_epoch=6, batch_fraction=0.15, dtype=torch.float64, block_steps=4)
    a = EpochBrownian(0.0, 0.01, (5, 3), seed=11, **kw)
    b = EpochBrownian(0.0, 0.01, (5, 3), seed=11, **kw)
    fwd = [a(k * 0.01, (k + 1) * 0.01).clone() for k in range(20)]
    bwd = [b(k * 0.01, (k + 1) * 0.01).clone() for k in reversed(range(20))][::-1]
    for x, y in zip(fwd, bwd):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(a(0.03, 0.17), sum(fwd[3:17]))
    torch.testing.assert_close(a.increments(3, 17), torch.stack(fwd[3:17]))
    assert not torch.equal(EpochBrownian(0.0, 0.01, (5, 3), seed=11, stream=1, **kw)(0.0, 0.01), fwd[0])
    assert not torch.equal(EpochBrownian(0.0, 0.01, (5, 3), seed=12, **kw)(0.0, 0.01), fwd[0])
    with pytest.raises(ValueError, match="α·S <= 1"):
        EpochBrownian(0.0, 0.01, (2,), steps_per_epoch=4, batch_fraction=0.3)
    with pytest.raises(ValueError, match="not on the Brownian grid"):
        a(0.0, 0.015)


def test_sdeint_with_the_pinned_driver_returns_to_the_start_at_every_epoch_end():
    class Pure(torch.nn.Module):  # dy = dW: y(t) − y(0) is the driver itself
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return torch.zeros_like(y)

        def g(self, t, y):
            return torch.ones_like(y)

    S, dt = 4, 0.05
    bm = EpochBrownian(0.0, dt, (6, 2), steps_per_epoch=S, seed=0, dtype=torch.float64)
    ts = time_grid(3 * S * dt, dt)
    y0 = torch.randn(6, 2, dtype=torch.float64)
    ys = torchsde.sdeint(Pure(), y0, ts, bm=bm, dt=dt, method="euler")
    for e in range(1, 4):
        torch.testing.assert_close(ys[e * S], y0, rtol=0, atol=1e-12)
    assert float((ys[S // 2] - y0).abs().max()) > 1e-3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_device_is_honoured(device):
    bm = EpochBrownian(0.0, 0.1, (8, 3), steps_per_epoch=5, seed=1, device=device, dtype=torch.float32)
    x = bm(0.0, 0.2)
    assert x.device.type == device and x.dtype == torch.float32 and bm.device.type == device
    assert float(bm(0.0, 0.5).abs().max()) < 1e-5
