"""sequence_linear_statistics (a Linear along positions) against autograd's per-sample gradients."""

from __future__ import annotations

import pytest
import torch

import sdelip.rules.linear as lin


@pytest.mark.parametrize("shape", [(7, 5, 6), (7, 2, 3, 6), (7, 9, 6)])
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("chunk_bytes", [8 << 20, 64, 2000])
def test_sequence_linear_statistics_equal_per_sample_gradients(shape, split, chunk_bytes):
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 10).double()
    x = torch.randn(*shape, dtype=torch.float64)
    delta = torch.randn_like(layer(x))
    u, v = torch.randn(10, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    g = torch.stack([torch.autograd.grad((layer(x[i:i + 1]) * delta[i:i + 1]).sum(), layer.weight)[0]
                     for i in range(shape[0])])
    st = lin.sequence_linear_statistics(x, delta, u, v, split, chunk_bytes)
    torch.testing.assert_close(st.Gv, g @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.Gtu, g.mT @ u, rtol=1e-12, atol=1e-12)
    if split:
        torch.testing.assert_close(st.sum_g, g.sum(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.sum_sq, g.square().sum(0), rtol=1e-12, atol=1e-12)
    else:
        assert st.sum_sq is None
