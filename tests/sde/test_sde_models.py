"""The SDE systems on the models researchers train: a transformer classifier with dropout, a ResNet in eval mode.

- ResNet-style (Conv2d, BatchNorm2d in eval mode, skip connections, Linear head): the
  factored live SDE equals the materialised oracle (drift, Euler increments, log K rows
  and terms) in float64 to 1e-10.
- Transformer classifier (Embedding, positional Embedding, TransformerEncoderLayer:
  attention's in_proj_weight and out_proj, linear1/2): ``LipschitzSDE(model, data)``
  picks the materialised engine, and its Thm 14 terms at θ0 on its own noise batch equal
  the tracker's (a different code path: the factored rules) on the same batch; with
  dropout, ``torchsde.sdeint`` runs (attention dropout drawn per sample under vmap) and
  every layer has a non-zero diffusion.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchsde
from torch import nn

from sdelip.engines import EngineError
from sdelip.sde import DataSource, GridBrownian, LipschitzSDE, time_grid
from sdelip.tracking.tracker import Tracker

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread (tests/conftest.py)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.block = Block(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.block(F.relu(self.bn(self.stem(x))))
        return self.fc(h.mean((-1, -2)))


class Classifier(nn.Module):
    def __init__(self, d=8, vocab=9, T=4, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=dropout, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, t):
        h = self.embed(t) + self.pos(torch.arange(t.shape[1]))
        return self.head(self.enc(h).mean(1))


def _resnet(N=24, seed=0):
    torch.manual_seed(seed)
    model = TinyResNet().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    return model, (torch.randn(N, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (N,), generator=g))


def _tokens(N=24, T=4, vocab=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (N, T), generator=g), torch.randint(0, 3, (N,), generator=g)


def test_resnet_in_eval_mode_factored_equals_materialised():
    model, data = _resnet()
    kw = dict(lr=0.1, noise_batch_size=4, seed=5)
    fac = LipschitzSDE(model, data, engine="factored", **kw)
    mat = LipschitzSDE(model, data, engine="materialised", **kw)
    assert LipschitzSDE(model, data, **kw).engine == "factored"
    assert fac.layer_names == ["stem", "block.conv1", "block.conv2", "fc"]
    n = 3
    y = fac.initial_state(n)
    y[:, : fac.n_params] += 0.05 * torch.randn(n, fac.n_params, dtype=DT, generator=torch.Generator().manual_seed(2))
    v = torch.randn(n, fac.brownian_size, dtype=DT, generator=torch.Generator().manual_seed(3))
    f1, g1 = fac.f_and_g_prod(0.0, y, v)
    f2, g2 = mat.f_and_g_prod(0.0, y, v)
    torch.testing.assert_close(f1, f2, **TOL)
    torch.testing.assert_close(g1, g2, **TOL)
    for k, t in fac.terms(0.0, y).items():
        torch.testing.assert_close(t, mat.terms(0.0, y)[k], **TOL)
    assert bool((fac.terms(0.0, y)["diffusion_sq"] > 0).all())


def test_transformer_sde_terms_equal_the_trackers_on_the_same_batch():
    torch.manual_seed(1)
    model = Classifier().double()
    X, Y = _tokens()
    M, lr = 6, 0.1
    sde = LipschitzSDE(model, (X, Y), lr=lr, noise_batch_size=M, seed=7)
    assert sde.engine == "materialised"
    assert sde.layer_names == ["embed", "pos", "enc.self_attn.in_proj_weight", "enc.self_attn.out_proj",
                               "enc.linear1", "enc.linear2", "head"]
    y = sde.initial_state(1)
    terms = sde.terms(0.0, y)
    Xb, Yb = DataSource((X, Y), seed=7).sample(M, 1)  # the SDE's noise batch (the drift uses the full set)
    m = copy.deepcopy(model)
    tr = Tracker(m, None, lr=lr, engine="factored")
    row = tr.backward(F.cross_entropy(m(Xb[0]), Yb[0], reduction="none")).as_row()
    for l, name in enumerate(sde.layer_names):
        for q in ("noise_curvature", "diffusion_sq"):
            torch.testing.assert_close(terms[q][0, l].item(), row[f"{q}/{name}"], rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(terms["sigma1"][0, l].item(), row[f"K/{name}"], rtol=1e-12, atol=0)
        assert terms["diffusion_sq"][0, l] > 0


def test_transformer_with_dropout_simulates_with_sdeint():
    torch.manual_seed(2)
    model = Classifier(dropout=0.1).double().train()
    sde = LipschitzSDE(model, _tokens(), lr=0.05, noise_batch_size=4, seed=3)
    n, dt = 3, 0.05
    ts = time_grid(t1=2 * dt, dt=dt)
    bm = GridBrownian(t0=0.0, dt=dt, size=(n, sde.brownian_size), seed=0, dtype=DT)
    ys = torchsde.sdeint(sde, sde.initial_state(n, dtype=DT), ts, bm=bm, dt=dt, method="euler")
    K_ito, K_direct = sde.lipschitz(ys), sde.direct_lipschitz(ys)
    assert bool(torch.isfinite(K_ito).all()) and bool(torch.isfinite(K_direct).all())
    torch.testing.assert_close(K_ito[0], K_direct[0])
    assert float((K_ito[-1] - K_ito[0]).abs().min()) > 0  # every trajectory moved
    assert bool((sde.terms(dt, ys[1])["diffusion_sq"] > 0).all())


class SeqFirst(nn.Module):
    """A Linear applied to sequence-first (T, M, d) activations."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):  # x (M, T, 3)
        h = torch.tanh(self.a(x.transpose(0, 1))).cumsum(0)
        return self.b(h).mean(0)


@pytest.mark.parametrize("T", [4, 5])  # T = 4 = M: the sizes cannot tell the axes apart
def test_sequence_first_layers_take_the_materialised_engine(T):
    torch.manual_seed(3)
    model = SeqFirst().double()
    g = torch.Generator().manual_seed(4)
    data = (torch.randn(20, T, 3, generator=g, dtype=DT), torch.randint(0, 3, (20,), generator=g))
    kw = dict(lr=0.1, noise_batch_size=4, seed=5)
    assert LipschitzSDE(model, data, **kw).engine == "materialised"
    msg = r"layer 'a': its input has shape \(%d, 1, 3\) for one sample and \(%d, 2, 3\) for two" % (T, T)
    with pytest.raises(EngineError, match=msg):
        LipschitzSDE(model, data, engine="factored", **kw)
    # the materialised terms equal the tracker's (which probes the batch axis) on the same batch
    sde = LipschitzSDE(model, data, **kw)
    terms = sde.terms(0.0, sde.initial_state(1))
    Xb, Yb = DataSource(data, seed=5).sample(4, 1)
    m = copy.deepcopy(model)
    row = Tracker(m, None, lr=0.1).backward(F.cross_entropy(m(Xb[0]), Yb[0], reduction="none")).as_row()
    for l, name in enumerate(sde.layer_names):
        torch.testing.assert_close(terms["diffusion_sq"][0, l].item(), row[f"diffusion_sq/{name}"], rtol=1e-9, atol=0)
