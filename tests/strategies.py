"""Hypothesis strategies shared by the math-core tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

# Square, tall, wide, single row, single column.
SHAPES = st.one_of(
    st.integers(1, 6).map(lambda k: (k, k)),
    st.tuples(st.integers(2, 7), st.integers(1, 6)).filter(lambda s: s[0] > s[1]),
    st.tuples(st.integers(1, 6), st.integers(2, 7)).filter(lambda s: s[0] < s[1]),
    st.integers(1, 7).map(lambda n: (1, n)),
    st.integers(1, 7).map(lambda m: (m, 1)),
)


def random_orthonormal(k: int, r: int, gen: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def separated_matrix(m: int, n: int, seed: int, min_gap: float = 0.1, scale: float = 1.0) -> torch.Tensor:
    """A float64 (m, n) matrix whose singular values are separated by a relative gap ≥ min_gap."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U = random_orthonormal(m, p, gen)
    V = random_orthonormal(n, p, gen)
    ratios = 1.0 - min_gap - (1.0 - 2 * min_gap) * torch.rand(p, generator=gen, dtype=torch.float64)
    s = scale * torch.cumprod(torch.cat([torch.ones(1, dtype=torch.float64), ratios[1:]]), 0)
    return (U * s) @ V.mT


@st.composite
def matrices(draw, min_gap: float = 0.1):
    m, n = draw(SHAPES)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.3, 1.0, 4.0]))
    return separated_matrix(m, n, seed, min_gap=min_gap, scale=scale)


@st.composite
def layer_with_gradients(draw, min_gap: float = 0.1):
    """(W, G): a well-separated matrix and M per-sample gradients with a non-zero mean."""
    W = draw(matrices(min_gap=min_gap))
    M = draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    m, n = W.shape
    G = torch.randn(M, m, n, generator=gen, dtype=torch.float64) + torch.randn(m, n, generator=gen, dtype=torch.float64)
    return W, G
