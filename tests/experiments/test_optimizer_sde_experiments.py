"""The exact expectation that experiments/adam_early_bias.py gives real Adam's v (issue 26), and the SVAG weights
of experiments/svag_optimizer_sde.py, against brute force."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import torch
from torch import nn

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _load(name: str):
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))  # the scripts import their sibling ensemble_optimizer_sde
    spec = importlib.util.spec_from_file_location(f"_experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_expected_batch_square_is_the_mean_over_every_batch_of_distinct_samples():
    """E_B[ĝ_B∘ĝ_B] = ∇L² + (N − M)/(M(N − 1))·σ² against the average over all C(N, M) batches (float64)."""
    mod = _load("adam_early_bias")
    torch.manual_seed(0)
    N, M = 7, 3
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    X, Y = torch.randn(N, 4, dtype=torch.float64), torch.randint(0, 2, (N,))
    got = mod.expected_batch_square(model, X, Y, M)
    acc = {p: torch.zeros_like(p) for p in model.parameters()}
    batches = list(itertools.combinations(range(N), M))
    for b in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(X[list(b)]), Y[list(b)]).backward()
        for p in model.parameters():
            acc[p] += p.grad ** 2 / len(batches)
    for p in model.parameters():
        torch.testing.assert_close(got[p], acc[p], rtol=1e-10, atol=1e-14)


def test_svag_weights_keep_the_mean_and_multiply_the_variance_by_ell():
    """r1 + r2 = 1 and r1² + r2² = ℓ for r1,2 = (1 ± √(2ℓ − 1))/2: the gradient's mean stays ∇L, its noise
    covariance becomes ℓ times one batch's (two independent batches)."""
    mod = _load("svag_optimizer_sde")
    for ell in (1, 2, 4, 8):
        r1, r2 = mod.svag_weights(ell)
        assert math.isclose(r1 + r2, 1.0) and math.isclose(r1 ** 2 + r2 ** 2, ell)
    assert mod.svag_weights(1) == (1.0, 0.0)  # ℓ = 1 is the plain run
