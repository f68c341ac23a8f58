"""The Prop 6 split of a convolution on a small map by pairs of positions equals the per-sample route."""

from __future__ import annotations

import pytest
import torch

import sdelip.rules.conv as conv


@pytest.mark.parametrize("make,shape", [
    (lambda: torch.nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 2)),        # P = 1
    (lambda: torch.nn.Conv2d(6, 10, 3, padding=1), (2, 2)),                  # P = 4
    (lambda: torch.nn.Conv2d(6, 10, 1, stride=2), (3, 3)),                   # 1 × 1 downsample, P = 4
    (lambda: torch.nn.Conv2d(6, 10, (1, 2), dilation=2), (1, 5)),            # P = 3
    (lambda: torch.nn.Conv2d(6, 10, 3, padding="same", padding_mode="reflect"), (2, 2)),
    (lambda: torch.nn.Conv1d(6, 10, 3), (4,)),                               # lifted, P = 2
])
@pytest.mark.parametrize("with_sum_g", [True, False])
@pytest.mark.parametrize("chunk_bytes", [8 << 20, 64])
def test_pair_route_equals_per_sample_route(make, shape, with_sum_g, chunk_bytes, monkeypatch):
    torch.manual_seed(0)
    m = make().double()
    geo = conv.ConvGeometry.of(m)
    x = torch.randn(7, 6, *shape, dtype=torch.float64)
    delta = torch.randn_like(m(x))
    K = m.weight[0].numel()
    u, v = torch.randn(10, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
    u, v = u / u.norm(), v / v.norm()
    P = delta[0, 0].numel()
    assert P * (P + 1) // 2 <= conv.PAIR_MAX_PAIRS
    pairs = conv.conv_statistics(geo, x, delta, u, v, True, chunk_bytes, with_sum_g)
    monkeypatch.setattr(conv, "PAIR_MAX_PAIRS", 0)
    ref = conv.conv_statistics(geo, x, delta, u, v, True, chunk_bytes, with_sum_g)
    # and the per-sample gradients themselves, by autograd
    g = torch.stack([torch.autograd.grad((m(x[i:i + 1]) * delta[i:i + 1]).sum(), m.weight)[0].reshape(10, K)
                     for i in range(7)])
    torch.testing.assert_close(ref.sum_sq, g.square().sum(0), rtol=1e-12, atol=1e-12)
    for f in ("Gv", "Gtu", "sum_g", "sum_sq"):
        a, b = getattr(pairs, f), getattr(ref, f)
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
