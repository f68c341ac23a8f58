"""The factored live SDE (issue #10) against the materialised oracle, and the drift-noise law.

- Oracle: the factored engine (weighted backward per trajectory, projections from layer
  inputs and output gradients) and the materialised engine (per-sample gradients by
  vmap) give the same drift, Euler increments G·v and log K rows for the same Brownian
  increments and the same batches, in float64 to 1e-10, on an MLP, a ConvNet with
  stride/padding/dilation/groups/reflect padding, a model with untracked LayerNorm and
  BatchNorm (eval) parameters and a frozen layer, and a Linear applied along a sequence.
- The Gram ("fast") and SVD decomposition routes give the same terms.
- grad_source="batch": one Euler step of length dt = η has the step covariance of Def 4,
  η² Var[g]/M, when the diffusion is shrunk by √(1 − M/B), and (1 + M/B) times it without
  the compensation (Monte Carlo over 40,000 trajectories at one θ).
- The systems have no dense g; DenseDiffusion offers it only for small systems (or when
  forced); sdeint runs from bm alone.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchsde
from torch import nn

from sdelip.engines import EngineError
from sdelip.sde import DenseDiffusion, GridBrownian, LipschitzSDE, ParameterSDE

TOL = dict(rtol=1e-10, atol=1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread (tests/conftest.py)


class SequenceModel(nn.Module):
    """A Linear applied along a sequence axis, mean-pooled, then a classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x (B, T, 4)
        return self.head(torch.tanh(self.embed(x)).mean(1))


def _case(kind: str, N: int = 40, seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
        X = torch.randn(N, 3, generator=gen)
    elif kind == "conv":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 4 * 4, 2),
        )
        X = torch.randn(N, 2, 8, 8, generator=gen)
    elif kind == "norm":  # untracked noise blocks (LayerNorm, BatchNorm in eval) and a frozen layer
        model = nn.Sequential(nn.Linear(3, 6, bias=False), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 6),
                              nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
        model[3].requires_grad_(False)
        model[4].running_mean.uniform_(-0.5, 0.5)
        model.eval()
        X = torch.randn(N, 3, generator=gen)
    elif kind == "sequence":
        model = SequenceModel()
        X = torch.randn(N, 5, 4, generator=gen)
    else:
        raise KeyError(kind)
    n_classes = 3 if kind == "sequence" else 2
    return model.double(), (X.double(), torch.randint(0, n_classes, (N,), generator=gen))


def _pair(cls, model, data, **kw):
    kw = {"lr": 0.1, "noise_batch_size": 5, "seed": 11, **kw}
    return cls(model, data, engine="factored", **kw), cls(model, data, engine="materialised", **kw)


def _state(sde, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = sde.initial_state(n)
    y[:, : sde.n_params] += 0.1 * torch.randn(n, sde.n_params, generator=gen, dtype=y.dtype)
    return y


@pytest.mark.parametrize("kind", ["mlp", "conv", "norm", "sequence"])
@pytest.mark.parametrize("cls", [ParameterSDE, LipschitzSDE])
def test_factored_increments_equal_the_materialised_oracle(kind, cls):
    model, data = _case(kind)
    fac, mat = _pair(cls, model, data)
    assert fac.engine == "factored" and mat.engine == "materialised"
    n = 4
    y = _state(fac, n)
    v = torch.randn(n, fac.brownian_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    f1, g1 = fac.f_and_g_prod(0.0, y, v)
    f2, g2 = mat.f_and_g_prod(0.0, y, v)
    torch.testing.assert_close(f1, f2, **TOL)
    torch.testing.assert_close(g1, g2, **TOL)
    assert float(g1[:, : fac.n_params].abs().max()) > 0  # the increments are not trivially zero
    if cls is LipschitzSDE:
        for k, t in fac.terms(0.0, y).items():
            torch.testing.assert_close(t, mat.terms(0.0, y)[k], **TOL)
    # A later step (new state, new batch) still agrees: the two draw the same data.
    y2 = y + 0.01 * g1
    torch.testing.assert_close(fac.f_and_g_prod(0.1, y2, v)[1], mat.f_and_g_prod(0.1, y2, v)[1], **TOL)


@pytest.mark.parametrize("options", [
    {"shared_noise_batch": True},
    {"weight_decay": 0.03},
    {"grad_source": "batch", "grad_batch_size": 12},
    {"traj_chunk": 2},
    {"noise_coupling": "shared"},
    {"noise_coupling": "shared", "grad_source": "batch", "grad_batch_size": 12, "shared_noise_batch": True},
])
def test_factored_oracle_with_options(options):
    model, data = _case("mlp")
    fac, mat = _pair(LipschitzSDE, model, data, **options)
    y = _state(fac, 5, seed=1)
    v = torch.randn(5, fac.brownian_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for a, b in zip(fac.f_and_g_prod(0.0, y, v), mat.f_and_g_prod(0.0, y, v)):
        torch.testing.assert_close(a, b, **TOL)
    # f then g_prod separately (the noise pass runs again on the cached batch) gives the same.
    y2 = y.clone()
    torch.testing.assert_close(fac.f(0.0, y2), mat.f(0.0, y2), **TOL)
    torch.testing.assert_close(fac.g_prod(0.0, y2, v), mat.g_prod(0.0, y2, v), **TOL)


def test_gram_route_equals_svd_route():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(70, 80), nn.Tanh(), nn.Linear(80, 66), nn.Tanh(), nn.Linear(66, 2)).double()
    gen = torch.Generator().manual_seed(2)
    data = (torch.randn(60, 70, generator=gen, dtype=torch.float64), torch.randint(0, 2, (60,), generator=gen))
    fast = LipschitzSDE(model, data, lr=0.1, noise_batch_size=6, seed=5, decomposition="fast")
    svd = LipschitzSDE(model, data, lr=0.1, noise_batch_size=6, seed=5, decomposition="svd")
    auto = LipschitzSDE(model, data, lr=0.1, noise_batch_size=6, seed=5)
    assert [auto.extra_rows.route(layer.shape, "cpu") for layer in auto.layers] == ["fast", "fast", "svd"]
    y = _state(fast, 3)
    v = torch.randn(3, fast.brownian_size, dtype=torch.float64)
    for a, b in zip(fast.f_and_g_prod(0.0, y, v), svd.f_and_g_prod(0.0, y, v)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    for k, t in fast.terms(0.0, y).items():
        torch.testing.assert_close(t, svd.terms(0.0, y)[k], rtol=1e-8, atol=1e-12)


def test_a_layer_called_twice_is_refused_by_the_factored_engine():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))

    model = Twice().double()
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(20, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (20,), generator=gen))
    sde = ParameterSDE(model, data, lr=0.1, noise_batch_size=4)
    y = sde.initial_state(2)
    with pytest.raises(EngineError, match="'a' is called 2 times.*engine='materialised'"):
        sde.f_and_g_prod(0.0, y, torch.zeros(2, sde.brownian_size, dtype=torch.float64))
    mat = ParameterSDE(model, data, lr=0.1, noise_batch_size=4, engine="materialised")
    assert torch.isfinite(mat.f_and_g_prod(0.0, y, torch.ones(2, mat.brownian_size, dtype=torch.float64))[1]).all()
    with pytest.raises(ValueError, match="engine must be"):
        ParameterSDE(model, data, lr=0.1, noise_batch_size=4, engine="vmap-please")


# -- grad_source="batch": the law of one Euler step ------------------------------------


def _step_data(N: int = 30):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 2, generator=gen, dtype=torch.float64), torch.randint(0, 2, (N,), generator=gen)


def _euler_step_and_var_g(sde, model, X, Y, n: int, eta: float):
    """One Euler step (dt = η) of n trajectories from θ(0), and Var[g] of the N per-sample gradients
    (autograd, one at a time: the law of a draw with replacement)."""
    y = sde.initial_state(n)
    v = torch.randn(n, sde.brownian_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * eta**0.5
    f, gv = sde.f_and_g_prod(0.0, y, v)
    per = []
    for x, t in zip(X, Y):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), t[None]).backward()
        per.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    per = torch.stack(per)
    return f * eta + gv, torch.cov(per.T, correction=0), per


def _step_covariance(compensate: bool, n: int = 40_000, M: int = 4, B: int = 8, eta: float = 0.5):
    """Empirical covariance of one Euler step (dt = η) of n trajectories at one θ, and Def 4's η² Var[g]/M."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2)).double()
    X, Y = _step_data()
    sde = ParameterSDE(model, (X, Y), lr=eta, noise_batch_size=M, grad_source="batch", grad_batch_size=B,
                       compensate_drift_noise=compensate, seed=2)
    assert sde.noise_scale == (math.sqrt(1 - M / B) if compensate else 1.0)
    step, var_g, per = _euler_step_and_var_g(sde, model, X, Y, n, eta)
    return torch.cov(step.T), eta**2 * var_g / M, per.mean(0), step.mean(0)


def test_batch_drift_with_shrunk_diffusion_has_the_step_covariance_of_def4():
    emp, target, mean_g, mean_step = _step_covariance(True)
    # every direction: the quadratic forms along the eigenvectors of the target
    w, Q = torch.linalg.eigh(target)
    ratio = torch.diagonal(Q.mT @ emp @ Q) / w
    keep = w > 1e-6 * w.max()
    assert bool(((ratio[keep] - 1).abs() < 0.06).all()), ratio.tolist()
    torch.testing.assert_close(mean_step, -0.5 * mean_g, atol=4 * float(emp.diagonal().max().sqrt()) / 200, rtol=0)


def test_without_compensation_the_batch_drift_inflates_the_step_covariance():
    emp, target, _, _ = _step_covariance(False)
    ratio = torch.trace(emp) / torch.trace(target)
    assert abs(float(ratio) - 1.5) < 0.08, float(ratio)  # 1 + M/B


def test_batch_drift_smaller_than_the_noise_batch_is_refused():
    model, data = _case("mlp")
    with pytest.raises(ValueError, match="grad_batch_size B = 5.*use B > 5"):
        ParameterSDE(model, data, lr=0.1, noise_batch_size=5, grad_source="batch", grad_batch_size=5)
    ParameterSDE(model, data, lr=0.1, noise_batch_size=5, grad_source="batch", grad_batch_size=5,
                 compensate_drift_noise=False)
    sde = ParameterSDE(model, data, lr=0.1, noise_batch_size=5, grad_source="batch", grad_batch_size=6, dt=0.05)
    assert sde.noise_scale == pytest.approx(math.sqrt(1 - 0.5 * 5 / 6))


@pytest.mark.parametrize("kind", ["conv", "norm"])
def test_shared_noise_coupling_factored_equals_materialised(kind):
    model, data = _case(kind)
    fac, mat = _pair(LipschitzSDE, model, data, noise_coupling="shared")
    assert fac.brownian_size == fac.M == 5
    y = _state(fac, 3, seed=2)
    v = torch.randn(3, fac.brownian_size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for a, b in zip(fac.f_and_g_prod(0.0, y, v), mat.f_and_g_prod(0.0, y, v)):
        torch.testing.assert_close(a, b, **TOL)
    # the dense g (same cached evaluation) times v is the same increment
    gv = mat.g_prod(0.0, y, v)
    torch.testing.assert_close(torch.einsum("nsb,nb->ns", DenseDiffusion(mat).g(0.0, y), v), gv, **TOL)


def _coupled_step_covariance(coupling: str, n: int = 40_000, M: int = 4, eta: float = 0.5):
    """One Euler step (dt = η, full-set drift) of n trajectories of a two-layer MLP at one θ:
    its empirical covariance, Def 4's η² Var[g]/M with the full Var[g] (all layers), and the
    slice of the first layer's parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, Y = _step_data()
    sde = ParameterSDE(model, (X, Y), lr=eta, noise_batch_size=M, grad_source="full", noise_coupling=coupling, seed=2)
    step, var_g, _ = _euler_step_and_var_g(sde, model, X, Y, n, eta)
    first = slice(0, 2 * 3 + 3)  # fc1 weight and bias (one noise block)
    return torch.cov(step.T), eta**2 * var_g / M, first


def test_shared_noise_coupling_has_the_full_step_covariance_across_layers():
    emp, target, first = _coupled_step_covariance("shared")
    w, Q = torch.linalg.eigh(target)
    ratio = torch.diagonal(Q.mT @ emp @ Q) / w
    keep = w > 1e-6 * w.max()
    assert bool(((ratio[keep] - 1).abs() < 0.06).all()), ratio.tolist()
    # the cross-layer block is there and matches
    cross_t, cross_e = target[first, first.stop:], emp[first, first.stop:]
    assert float(cross_t.abs().max()) > 0.2 * float(target.diagonal().max())
    assert float((cross_e - cross_t).abs().max()) < 0.06 * float(target.diagonal().max())


def test_layer_coupling_has_block_diagonal_step_covariance():
    """Assumption 3 (the default): the same diagonal blocks, no covariance across layers."""
    emp, target, first = _coupled_step_covariance("layers")
    scale = float(target.diagonal().max())
    assert float(emp[first, first.stop:].abs().max()) < 0.03 * scale
    assert float(target[first, first.stop:].abs().max()) > 0.2 * scale
    for blk in (first, slice(first.stop, None)):
        assert float((emp[blk, blk] - target[blk, blk]).abs().max()) < 0.06 * scale
    with pytest.raises(ValueError, match="noise_coupling must be 'layers'"):
        ParameterSDE(nn.Linear(2, 2), (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), lr=0.1,
                     noise_batch_size=2, noise_coupling="full")


# -- the dense diffusion ----------------------------------------------------------------


def test_dense_g_only_for_small_systems_and_sdeint_runs_from_bm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(700, 800), nn.Tanh(), nn.Linear(800, 2))
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 700, generator=gen), torch.randint(0, 2, (64,), generator=gen))
    sde = LipschitzSDE(model, data, lr=0.05, noise_batch_size=8)
    assert not sde.has_dense_diffusion and not hasattr(sde, "g")
    with pytest.raises(ValueError, match="no dense diffusion matrix.*bm="):
        DenseDiffusion(sde)
    bm = GridBrownian(0.0, 0.05, (2, sde.brownian_size), seed=0)
    ys = torchsde.sdeint(sde, sde.initial_state(2), torch.tensor([0.0, 0.1]), bm=bm, dt=0.05, method="euler")
    assert ys.shape == (2, 2, sde.state_size) and torch.isfinite(ys).all()
    assert sde.n_evaluations <= 3  # two Euler steps (torchsde's shape check shares the first evaluation)
    small = LipschitzSDE(nn.Linear(3, 2), (data[0][:, :3], data[1]), lr=0.05, noise_batch_size=4)
    assert small.has_dense_diffusion and not hasattr(small, "g")
    y = small.initial_state(2)
    assert DenseDiffusion(small).g(0.0, y).shape == (2, small.state_size, small.brownian_size)
    forced = LipschitzSDE(model, data, lr=0.05, noise_batch_size=8, dense_diffusion=True)
    assert forced.has_dense_diffusion and hasattr(DenseDiffusion(forced), "g")
    with pytest.raises(ValueError, match="no dense diffusion matrix"):
        DenseDiffusion(LipschitzSDE(nn.Linear(3, 2), (data[0][:, :3], data[1]), lr=0.05, noise_batch_size=4,
                                    dense_diffusion=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_factored_engine_on_cuda_equals_cpu():
    model, data = _case("conv")
    cpu = LipschitzSDE(model, data, lr=0.1, noise_batch_size=5, seed=11, decomposition="svd")
    y = _state(cpu, 3)
    v = torch.randn(3, cpu.brownian_size, dtype=torch.float64)
    ref = cpu.f_and_g_prod(0.0, y, v)
    gpu = LipschitzSDE(model.cuda(), (data[0].cuda(), data[1].cuda()), lr=0.1, noise_batch_size=5, seed=11,
                       decomposition="svd")
    out = gpu.f_and_g_prod(0.0, y.cuda(), v.cuda())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


def test_tied_weights_take_the_materialised_engine_and_count_every_use():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = Tied().double()
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(30, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (30,), generator=gen))
    sde = LipschitzSDE(model, data, lr=0.1, noise_batch_size=4)
    assert sde.engine == "materialised" and sde.uses.tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="'a' applies its weight 2 times.*engine='materialised'"):
        LipschitzSDE(model, data, lr=0.1, noise_batch_size=4, engine="factored")
    y = _state(sde, 3)
    s1 = sde.direct_lipschitz(y, per_layer=True)
    torch.testing.assert_close(sde.direct_lipschitz(y), s1[:, 0] ** 2 * s1[:, 1])
    z = sde.log_lipschitz(y, per_layer=True)
    torch.testing.assert_close(sde.lipschitz(y), torch.exp(2 * z[:, 0] + z[:, 1]))
    # the weight's noise is the total derivative over both uses: per-sample autograd oracle
    W = model.a.weight
    Xb, Yb = data[0][:4], data[1][:4]
    g = torch.stack([torch.autograd.grad(nn.functional.cross_entropy(model(Xb[i:i + 1]), Yb[i:i + 1]), W)[0]
                     for i in range(4)])
    est = sde.gradient_fn.per_sample_gradients({k: v[:1] for k, v in sde.params(sde.initial_state(1)).items()},
                                               (Xb[None], Yb[None]))
    torch.testing.assert_close(est["a.weight"][0], g)
