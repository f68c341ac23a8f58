"""Tied weights and modules called more than once, in every engine (issue 13).

A weight Parameter applied c times per forward pass is one tracked layer: one σ1(θ), one
set of Thm 14 terms from its per-sample gradient g_i = the total derivative over all
uses, and the factor σ1(θ)^c in the product bound K (Prop 8). Oracles, all float64:

- per layer: :func:`sdelip.core.formulas.layer_terms` on per-sample gradients from an
  autograd loop over the samples (``autograd.grad(losses[i], weight)``: the total
  derivative, independent of every engine);
- per network: Thm 14 applied to f(θ) = σ1(θ)^c with ∇f and ∇²f from
  ``torch.autograd.functional`` (dense, no Itô algebra of ours);
- one SGD step, averaged exactly over every mini-batch of a small data set: the
  network terms give E[ΔK/K] and Var[ΔK/K] to O(η²).
"""

import copy
import functools
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdelip.core.formulas import layer_terms
from sdelip.engines import EngineNotApplicableError, WeightUsesError, resolve_engine_name
from sdelip.rules.inventory import tracked_layers
from sdelip.record import load_metadata, load_record
from sdelip.core.spectral import weight_matrix
from sdelip.tracking.options import RuntimeOptions, TrackingOptions
from sdelip.tracking.tracker import Tracker

DT = torch.float64
LR = 0.05
CE = functools.partial(F.cross_entropy, reduction="none")
ENGINES = ("factored", "materialised", "coupled")


class TiedBranches(nn.Module):
    """b.weight = a.weight: one rectangular (6 × 5) θ applied by two modules to two inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(5, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x[:, :5])) * torch.tanh(self.b(x[:, 5:])))


class CalledTwice(nn.Module):
    """One nn.Linear applied twice in a row (a weight-tied recurrence)."""

    def __init__(self, twice=True):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.twice = twice

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.twice:
            h = torch.tanh(self.a(h))
        return self.head(h)


class TiedConvs(nn.Module):
    """Two Conv2d modules with different geometry sharing one kernel."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.c2.weight = self.c1.weight
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


class SequenceTwice(nn.Module):
    """A Linear applied twice along a position axis: g_i sums over positions and uses."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))).mean(1))


MODELS = {
    "tied_branches": (TiedBranches, (10,), {"a": 2, "head": 1}),
    "called_twice": (CalledTwice, (5,), {"a": 2, "head": 1}),
    "tied_convs": (TiedConvs, (2, 5, 5), {"c1": 2, "head": 1}),
    "sequence_twice": (SequenceTwice, (3, 4), {"a": 2, "head": 1}),
}


def make_data(shape, M=7, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, *shape, generator=g, dtype=DT), torch.randint(0, classes, (M,), generator=g)


def per_sample_grads(model, x, y, weights):
    """Total per-sample derivatives ∂ℓ_i/∂θ (matrix form) by an autograd loop over the samples."""
    losses = CE(model(x), y)
    return {name: torch.stack([weight_matrix(torch.autograd.grad(losses[i], w, retain_graph=True)[0])
                               for i in range(len(losses))]) for name, w in weights.items()}


def power_terms(W, G, c, lr, wd=0.0, s2=0.0):
    """Thm 14 for f(W) = σ1(W)^c with dense autograd ∇f, ∇²f (row-major vec), mini-batch G."""
    f = lambda X: torch.linalg.svdvals(X)[0] ** c  # noqa: E731
    W = W.detach()
    p = W.numel()
    fv = float(f(W))
    grad = torch.autograd.functional.jacobian(f, W).reshape(p)
    H = torch.autograd.functional.hessian(f, W).reshape(p, p)
    M = G.shape[0]
    g = G.reshape(M, p)
    gbar = g.mean(0) + wd * W.reshape(p)
    E = g - g.mean(0)
    sigma = E.T @ E / (M * (M - 1))
    total = sigma + s2 * torch.eye(p, dtype=DT)
    kappa = lr / (2 * fv) * float(torch.trace(H @ total))
    kappa_var = lr / (2 * fv) * float((H.diagonal() * total.diagonal()).sum())
    return {
        "Z": math.log(fv), "drift": -float(grad @ gbar) / fv, "diffusion_sq": lr * float(grad @ total @ grad) / fv**2,
        "noise_curvature": kappa, "noise_curvature_var": kappa_var, "noise_curvature_cov": kappa - kappa_var,
        "step_curvature": lr / (2 * fv) * float(gbar @ H @ gbar - torch.trace(H @ sigma)),
    }


def tracked_step(model, x, y, engine, split=True, wd=0.0, s2=0.0, **kw):
    m = copy.deepcopy(model)
    tr = Tracker(m, torch.optim.SGD(m.parameters(), lr=LR, weight_decay=wd), engine=engine,
                 options=TrackingOptions(split=split), loss_fn=CE, example_input=x, **kw)
    tr.extra_noise_var = s2
    row = tr.backward(CE(m(x), y), batch=(x, y)).as_row()
    tr.close()
    return row, tr


def assert_close(got, want, what, rtol=1e-9):
    assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-15), f"{what}: {got!r} vs oracle {want!r}"


# ----------------------------------------------------------------------------------------------
def test_tracked_layers_one_layer_per_weight_with_its_uses():
    model = TiedBranches().to(DT)
    layers = tracked_layers(model)
    assert [(l.name, l.aliases, l.calls, l.uses) for l in layers] == [("a", ("b",), (1, 1), 2), ("head", (), (1,), 1)]
    assert layers[0].modules == (model.a, model.b) and layers[0].module_names == ("a", "b")
    x, _ = make_data((5,))
    counted = tracked_layers(CalledTwice().to(DT), example_input=x)
    assert [(l.name, l.calls, l.uses) for l in counted] == [("a", (2,), 2), ("head", (1,), 1)]
    assert [l.uses for l in tracked_layers(CalledTwice().to(DT))] == [1, 1]  # no forward pass: one call each
    # an ordinary model keeps one layer per module, each used once
    plain = tracked_layers(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert [(l.name, l.aliases, l.uses) for l in plain] == [("0", (), 1), ("2", (), 1)]
    # a weight computed on access (a parametrization) is not tied to another one whose
    # temporary tensor happens to get the same id()
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, X):
            return X + X.T

    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    for lin in net:
        parametrize.register_parametrization(lin, "weight", Symmetric())
    assert [(l.name, l.uses) for l in tracked_layers(net)] == [(str(k), 1) for k in range(6)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("split,wd,s2", [(True, 0.0, 0.0), (True, 0.01, 0.3), (False, 0.0, 0.0)])
def test_terms_match_per_sample_autograd_and_dense_power_oracle(engine, model_name, split, wd, s2):
    """Per-layer columns: θ's own terms; network columns: the terms of Π σ1(θ)^c (rtol 1e-9)."""
    cls, shape, uses = MODELS[model_name]
    torch.manual_seed(1)
    model = cls().to(DT)
    x, y = make_data(shape, seed=2)
    row, tr = tracked_step(model, x, y, engine, split=split, wd=wd, s2=s2)
    assert {l.name: l.uses for l in tr.layers} == uses
    m = copy.deepcopy(model)
    weights = {l.name: dict(m.named_modules())[l.name].weight for l in tr.layers}
    grads = per_sample_grads(m, x, y, weights)
    net = dict.fromkeys(("Z", "drift", "diffusion_sq", "noise_curvature", "noise_curvature_var",
                         "noise_curvature_cov", "step_curvature"), 0.0)
    for name, W in weights.items():
        t = layer_terms(weight_matrix(W).detach(), grads[name], LR, weight_decay=wd, extra_noise_var=s2, split=split)
        for q in ("drift", "noise_curvature", "diffusion_sq", "gap", "step_curvature"):
            assert_close(row[f"{q}/{name}"], float(getattr(t, q)), f"{engine} {q}/{name}")
        assert_close(row[f"K/{name}"], float(t.sigma1), f"{engine} K/{name}", rtol=1e-12)
        if split:
            assert_close(row[f"noise_curvature_var/{name}"], float(t.noise_curvature_var), f"{engine} κ_var/{name}")
        else:
            assert np.isnan(row[f"noise_curvature_var/{name}"])
        for q, v in power_terms(weight_matrix(W), grads[name], uses[name], LR, wd, s2).items():
            net[q] += v
    assert_close(row["Z"], net["Z"], "Z", rtol=1e-12)
    assert_close(row["K"], math.exp(net["Z"]), "K", rtol=1e-12)
    for q in ("drift", "diffusion_sq", "noise_curvature", "step_curvature") + (
            ("noise_curvature_var", "noise_curvature_cov") if split else ()):
        assert_close(row[f"{q}_Z"], net[q], f"{engine} {q}_Z")
    if not split:
        assert np.isnan(row["noise_curvature_var_Z"])


@pytest.mark.parametrize("grouped_from", [0, 10**9])
def test_factored_tied_convs_both_per_sample_routes(grouped_from, monkeypatch):
    """The per-sample conv gradients of each use by grouped convolutions and by unfold + bmm."""
    from sdelip.rules import conv

    monkeypatch.setattr(conv, "GROUPED_CONV_MIN_POSITIONS", grouped_from)
    torch.manual_seed(3)
    model = TiedConvs().to(DT)
    x, y = make_data((2, 5, 5), seed=3)
    ref, _ = tracked_step(model, x, y, "materialised")
    for chunk_bytes in (None, 1):  # one sample per chunk, too
        row, _ = tracked_step(model, x, y, "factored", runtime=RuntimeOptions(chunk_bytes=chunk_bytes))
        for k, v in ref.items():
            if isinstance(v, float) and not np.isnan(v):
                assert_close(row[k], v, f"factored vs materialised {k}")


@pytest.mark.parametrize("engine", ENGINES)
def test_one_sgd_step_averaged_over_every_mini_batch(engine):
    """E[ΔK/K] = (μ_Z + κ_Z + step_curvature_Z)η + O(η³) and Var[ΔK/K] = λ_Z² η + O(η²) for K = σ1(θ)².

    The model's one weight θ is applied twice, so K = σ1(θ)² exactly (no other layer, no
    cross-layer covariance). Mini-batches of M = 2 drawn with replacement from N = 6
    samples: all 36 are enumerated, so the averages are exact expectations. The
    estimators are unbiased, so their averages equal the population terms (dense oracle).
    """

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(torch.tanh(self.a(x)))

    torch.manual_seed(3)
    model = Square().to(DT)
    N, M, lr = 6, 2, 1e-3
    X = 2 * torch.randn(N, 4, dtype=DT)
    Y = torch.randint(0, 4, (N,))
    rows, rel_change = [], []
    for idx in itertools.product(range(N), repeat=M):
        x, y = X[list(idx)], Y[list(idx)]
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        tr = Tracker(m, opt, engine=engine, loss_fn=CE, example_input=x)
        opt.zero_grad()
        row = tr.backward(CE(m(x), y), batch=(x, y)).as_row()
        opt.step()
        tr.close()
        rows.append(row)
        rel_change.append(float(torch.linalg.svdvals(m.a.weight.detach())[0]) ** 2 / row["K"] - 1.0)
    mean = {q: float(np.mean([r[f"{q}_Z"] for r in rows]))
            for q in ("drift", "noise_curvature", "diffusion_sq", "step_curvature")}
    # exact expectations: population terms of σ1², Σ = Cov(g)/M (the dense oracle)
    G = per_sample_grads(model, X, Y, {"a": model.a.weight})["a"]
    W = weight_matrix(model.a.weight).detach()
    pop_terms = power_terms(W, G, 2, lr)  # its Σ̂ over the N samples is Cov(g)/(N − 1) ...
    scale = (N - 1) / M  # ... and E[Σ̂] over batches of M drawn with replacement is Cov(g)/M
    assert_close(mean["drift"], pop_terms["drift"], "E[μ_Z]")
    assert_close(mean["diffusion_sq"], pop_terms["diffusion_sq"] * scale, "E[λ_Z²]")
    assert_close(mean["noise_curvature"], pop_terms["noise_curvature"] * scale, "E[κ_Z]")
    dK = np.array(rel_change)
    second_order = dK.mean() / lr - mean["drift"]
    assert second_order == pytest.approx(mean["noise_curvature"] + mean["step_curvature"], rel=3e-3)
    assert dK.var() / lr == pytest.approx(mean["diffusion_sq"], rel=2e-2)
    # the test can fail: θ's own terms counted c = 2 times without the ½c(c−1) pair terms miss > 5%
    own = {q: float(np.mean([r[f"{q}/a"] for r in rows])) for q in ("noise_curvature", "step_curvature")}
    assert abs(2 * (own["noise_curvature"] + own["step_curvature"]) / second_order - 1) > 0.05


@pytest.mark.parametrize("engine", ENGINES)
def test_a_module_called_more_often_than_counted_is_an_error(engine):
    torch.manual_seed(4)
    x, y = make_data((5,), seed=4)
    m = CalledTwice().to(DT)
    tr = Tracker(m, torch.optim.SGD(m.parameters(), lr=LR), engine=engine, loss_fn=CE)  # no example_input
    with pytest.raises(WeightUsesError, match=r"'a' was called more than once \(2 times\).*example_input"):
        tr.backward(CE(m(x), y), batch=(x, y))
    tr.close()
    # counted by example_input, then the structure changes
    m = CalledTwice().to(DT)
    tr = Tracker(m, torch.optim.SGD(m.parameters(), lr=LR), engine=engine, loss_fn=CE, example_input=x)
    assert tr.backward(CE(m(x), y), batch=(x, y)) is not None
    m.twice = False
    with pytest.raises(WeightUsesError,
                       match=r"'a' was called fewer times than counted \(1 time\) .* at step 1, but the tracker counts 2"):
        m(x)
    tr.close()


def test_weight_tied_to_an_embedding_is_the_total_derivative():
    """lm_head.weight = embed.weight: one θ whose per-sample gradient sums the embedding's and the head's use."""

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(6, 4)
            self.hidden = nn.Linear(4, 4)
            self.head = nn.Linear(4, 6, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(torch.tanh(self.hidden(self.embed(tokens))))

    torch.manual_seed(5)
    model = LM().to(DT)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 6, (8,), generator=g), torch.randint(0, 6, (8,), generator=g)
    # the embedding has a rule now: one θ used by both modules, the factored engine sums both uses
    assert resolve_engine_name(model, "auto") == "factored"
    m = copy.deepcopy(model)
    grads = per_sample_grads(m, x, y, {"embed": m.embed.weight})["embed"]
    want = layer_terms(weight_matrix(m.embed.weight).detach(), grads, LR)
    for engine in ("auto", "factored", "coupled", "materialised"):
        row, tr = tracked_step(model, x, y, engine)
        assert [(l.name, l.aliases, l.uses) for l in tr.layers] == [("embed", ("head",), 2), ("hidden", (), 1)]
        for q in ("drift", "noise_curvature", "noise_curvature_var", "diffusion_sq"):
            assert_close(row[f"{q}/embed"], float(getattr(want, q)), f"{engine} {q}/embed")


def test_record_metadata_and_consumers_of_a_tied_model(tmp_path):
    from sdelip.cli import terms_summary
    from sdelip.sde import ReducedLipschitzSDE

    torch.manual_seed(6)
    model = TiedBranches().to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    path = tmp_path / "tied.db"
    with Tracker(model, opt, record=path) as tr:
        for k in range(4):
            x, y = make_data((10,), M=8, seed=10 + k)
            opt.zero_grad()
            tr.backward(CE(model(x), y))
            opt.step()
    df = load_record(path)
    assert df["uses/a"].tolist() == [2] * 4 and df["uses/head"].tolist() == [1] * 4
    assert "K/b" not in df and "drift/b" not in df  # b is not a layer of its own
    np.testing.assert_allclose(df["Z"], 2 * np.log(df["K/a"]) + np.log(df["K/head"]), rtol=1e-13)
    meta = load_metadata(path)["layers"]
    assert meta[0] == {"name": "a", "kind": "Linear", "shape": [6, 5], "uses": 2, "aliases": ["b"], "calls": [1, 1]}
    assert meta[1] == {"name": "head", "kind": "Linear", "shape": [3, 6]}
    # the per-layer reduced SDE simulates σ1(a)² as the factor of K: its moments are the network's
    per_layer = ReducedLipschitzSDE.from_record(df, per_layer=True).moments()
    network = ReducedLipschitzSDE.from_record(df, per_layer=False).moments()
    for q in ("mean_Z", "var_Z", "mean_K", "var_K"):
        np.testing.assert_allclose(getattr(per_layer, q), getattr(network, q), rtol=1e-12, err_msg=q)
    row = terms_summary(df)[-1]
    assert row["layer"] == "network"
    assert row["cov share of kappa"] == pytest.approx(df["noise_curvature_cov_Z"].sum() / df["noise_curvature_Z"].sum())
    assert terms_summary(df)[0]["layer"] == "a (used 2×)"


def test_records_of_untied_models_have_no_uses_columns(tmp_path):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with Tracker(model, opt, record=tmp_path / "plain.db") as tr:
        x, y = make_data((4,), M=6)
        tr.backward(CE(model(x), y))
    df = load_record(tmp_path / "plain.db")
    assert not [c for c in df.columns if c.startswith("uses/")]
    assert load_metadata(tmp_path / "plain.db")["layers"][0] == {"name": "0", "kind": "Linear", "shape": [5, 4]}


@pytest.mark.parametrize("c", [2, 3])
def test_repeated_use_terms_give_every_field_of_the_factor(c):
    """repeated_use_terms derives every LayerTerms field of σ1^c (by its catalogue rule) as the dense
    Thm 14 oracle of f = σ1^c gives it; a field without an oracle value here fails the test."""
    import attrs

    from sdelip.core.formulas import LayerTerms, repeated_use_terms, terms_from_projections
    from sdelip.core.spectral import decompose

    gen = torch.Generator().manual_seed(c)
    W = torch.randn(4, 6, generator=gen, dtype=DT)
    G = torch.randn(7, 4, 6, generator=gen, dtype=DT) + torch.randn(4, 6, generator=gen, dtype=DT)
    lr, wd, s2, M = 0.1, 0.01, 0.003, 7
    d = decompose(W)
    E = G - G.mean(0)
    noise_var = (E * E).sum(0) / (M * (M - 1))
    t = terms_from_projections(d, G @ d.v1, G.mT @ d.u1, lr, noise_var=noise_var, weight_decay=wd,
                               extra_noise_var=s2, diffusion_split=True)
    f = repeated_use_terms(t, c, lr, s2)
    want = power_terms(W, G, c, lr, wd, s2)
    want["sigma1"] = math.exp(want.pop("Z"))
    want["gap"] = float(d.gap)
    grad_f = c * float(d.sigma1) ** (c - 1) * torch.outer(d.u1, d.v1)
    want["diffusion_sq_var"] = lr / want["sigma1"] ** 2 * float((grad_f**2 * (noise_var + s2)).sum())
    assert set(want) == {a.name for a in attrs.fields(LayerTerms)} - {"degenerate"}
    for q, v in want.items():
        assert_close(float(getattr(f, q)), v, q, rtol=1e-9)
    assert f.degenerate is t.degenerate
