"""The tracker under the optimizers people train with (docs/theory.md §15), against float64 oracles.

Oracle of one tracked step: per-sample gradients g_i by an autograd loop over samples; the
update direction P = −Δ/η from a deep copy of the model and optimizer really stepping with
the mean gradient (the optimizer's own update map); the noise scale S from the optimizer's
own map by finite differences (SGD family) or written out independently (Adam: v at its
expectation over batches); the operator-norm Hessian H by autograd of svdvals. Then with
E_i = S∘(g_i − ḡ):

    μ = −u1ᵀPv1/σ1,   ‖λ‖² = (η/σ1²) Σ (u1ᵀE_i v1)²/(M(M−1)),
    κ = (η/2σ1) Σ vec(E_i)ᵀH vec(E_i)/(M(M−1)),   step curvature = (η/2σ1) vec(P)ᵀH vec(P) − κ.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdelip
from sdelip.analysis.prediction import UnmodelledUpdateError
from sdelip.tracking.optimizer_view import NotPlainSGDWarning
from sdelip.tracking.tracker import Tracker

from oracles import autograd_hessian

pytestmark = pytest.mark.usefixtures("one_thread")

M = 8


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()


def _data(conv, n=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64) if conv else \
        torch.randn(n, 5, generator=gen, dtype=torch.float64)
    return X, torch.randint(0, 3, (n,), generator=gen)


OPTIMIZERS = {
    "sgd-wd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
}


def _weights(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _per_sample(model, x, y):
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        out.append([m.weight.grad.reshape(m.weight.shape[0], -1).clone() for m in _weights(model)])
    model.zero_grad()
    return [torch.stack([o[l] for o in out]) for l in range(len(out[0]))]


def _step_copy(model, opt, x, y, lr, extra=None):
    """P = −Δ/η of the optimizer's own step on a copy, with the mini-batch mean gradient (+ ``extra`` per weight)."""
    m2 = copy.deepcopy(model)
    o2 = type(opt)(m2.parameters())
    o2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: load_state_dict shares same-dtype tensors
    o2.zero_grad()
    F.cross_entropy(m2(x), y).backward()
    if extra is not None:
        for w, e in zip(_weights(m2), extra):
            w.weight.grad += e.reshape(w.weight.shape)
    before = [w.weight.detach().clone() for w in _weights(m2)]
    o2.step()
    return [((b - w.weight.detach()) / lr).reshape(b.shape[0], -1) for b, w in zip(before, _weights(m2))]


def _noise_scale(name, model, opt, x, y, lr, ghat, noise_var, layer, tracked):
    """S of one layer (a float or a matrix), from the optimizer's own definition (``tracked``: the optimizer's param)."""
    group = opt.param_groups[0]
    p = tracked
    if name in ("sgd-wd", "momentum", "nesterov"):
        # the SGD family is affine in the gradient: S from the optimizer's own map by a finite difference
        gen = torch.Generator().manual_seed(layer)
        extra = [torch.zeros_like(w.weight) for w in _weights(model)]
        extra[layer] = 1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        P0, P1 = _step_copy(model, opt, x, y, lr), _step_copy(model, opt, x, y, lr, extra)
        e = extra[layer].reshape(P0[layer].shape)
        return float(((P1[layer] - P0[layer]) * e).sum() / (e * e).sum())
    st = opt.state[p] if p in opt.state else {}
    if name in ("adam", "adamw"):  # v held at its expectation over batches, g ≈ ḡ (docs/theory.md §15)
        b1, b2 = group["betas"]
        t = int(st["step"]) + 1 if st else 1
        v = st["exp_avg_sq"].reshape(ghat.shape) if st else torch.zeros_like(ghat)
        g = ghat + (group["weight_decay"] * p.detach().reshape(ghat.shape) if name == "adam" else 0.0)
        vn = b2 * v + (1 - b2) * (g * g + noise_var)
        D = 1.0 / ((vn / (1 - b2 ** t)).sqrt() + group["eps"])
        return (1 - b1) / (1 - b1 ** t) * D
    if name == "rmsprop":
        a = group["alpha"]
        v = st["square_avg"].reshape(ghat.shape) if st else torch.zeros_like(ghat)
        vn = a * v + (1 - a) * (ghat * ghat + noise_var)
        return 1.0 / (vn.sqrt() + group["eps"])
    raise KeyError(name)


def _oracle_terms(W, P, G, S, lr):
    M_ = G.shape[0]
    U, s, Vh = torch.linalg.svd(W)
    u1, v1, s1 = U[:, 0], Vh[0], s[0]
    ghat = G.mean(0)
    E = (G - ghat) * S if torch.is_tensor(S) else (G - ghat) * S
    H = autograd_hessian(W)
    vec = lambda A: A.mT.reshape(-1)
    c = 1.0 / (M_ * (M_ - 1))
    kappa = lr / (2 * s1) * c * sum(vec(e) @ H @ vec(e) for e in E)
    lam2 = lr / s1 ** 2 * c * sum((u1 @ e @ v1) ** 2 for e in E)
    return {"drift": -(u1 @ P @ v1) / s1, "noise_curvature": kappa, "diffusion_sq": lam2,
            "step_curvature": lr / (2 * s1) * (vec(P) @ H @ vec(P)) - kappa}


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_recorded_terms_equal_the_oracle_of_the_optimizers_update(name, conv):
    model = _convnet() if conv else _mlp()
    opt = OPTIMIZERS[name](model.parameters())
    X, Y = _data(conv)
    lr = opt.param_groups[0]["lr"]
    twin = copy.deepcopy(model)  # the oracle's model: no tracker hooks see its forward passes
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotPlainSGDWarning)
        tr = Tracker(model, opt)
    checked = 0
    for k in range(3):  # the optimizer's state evolves: the first step and later ones
        x, y = X[k * M:(k + 1) * M], Y[k * M:(k + 1) * M]
        twin.load_state_dict(model.state_dict())
        G = _per_sample(twin, x, y)
        P = _step_copy(twin, opt, x, y, lr)
        Ws = [w.weight.detach().reshape(w.weight.shape[0], -1).clone() for w in _weights(model)]
        oracles = []
        for l, (W, Gl, Pl) in enumerate(zip(Ws, G, P)):
            nv = ((Gl - Gl.mean(0)) ** 2).sum(0) / (M * (M - 1))
            S = _noise_scale(name, twin, opt, x, y, lr, Gl.mean(0), nv, l, _weights(model)[l].weight)
            oracles.append(_oracle_terms(W, Pl, Gl, S, lr))
        opt.zero_grad()
        tr.backward(F.cross_entropy(model(x), y, reduction="none"))
        opt.step()
        rec = tr.last
        assert rec.step == k and rec.update["update_modelled"]
        for layer, o in zip(tr.layers, oracles):
            got = rec.layers[layer.name]
            for key, want in o.items():
                assert math.isclose(got[key], float(want), rel_tol=1e-9, abs_tol=1e-13), (name, k, layer.name, key)
            # what the update did: first order exactly the drift, second order κ + step curvature
            assert math.isclose(got["realised_drift"], got["drift"], rel_tol=1e-9, abs_tol=1e-13)
            assert math.isclose(got["realised_curvature"], got["noise_curvature"] + got["step_curvature"],
                                rel_tol=1e-7, abs_tol=1e-13)
            checked += 1
    tr.close()
    assert checked == 3 * len(tr.layers)


def test_realised_increment_is_the_change_of_sigma1_to_third_order():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    X, Y = _data(False)
    with Tracker(model, opt) as tr:
        for k in range(4):
            s_before = [float(torch.linalg.svdvals(w.weight.detach())[0]) for w in _weights(model)]
            w_before = [w.weight.detach().clone() for w in _weights(model)]
            opt.zero_grad()
            tr.backward(F.cross_entropy(model(X[k * M:(k + 1) * M]), Y[k * M:(k + 1) * M], reduction="none"))
            opt.step()
            for layer, w, s0, w0 in zip(tr.layers, _weights(model), s_before, w_before):
                q = tr.last.layers[layer.name]
                s1 = float(torch.linalg.svdvals(w.weight.detach())[0])
                model_change = (q["realised_drift"] + q["realised_curvature"]) * tr.last.lr * q["K"]
                first_only = q["realised_drift"] * tr.last.lr * q["K"]
                step = float((w.weight.detach() - w0).norm())
                assert abs((s1 - s0) - model_change) <= 50 * step ** 3 / s0 ** 2 + 1e-15
                assert abs((s1 - s0) - model_change) < abs((s1 - s0) - first_only)


def _run(model, opt, steps, edit=None, X=None, Y=None):
    X, Y = _data(False) if X is None else (X, Y)
    tr = Tracker(model, opt)
    for k in range(steps):
        opt.zero_grad()
        tr.backward(F.cross_entropy(model(X[k * M:(k + 1) * M]), Y[k * M:(k + 1) * M], reduction="none"))
        if edit is not None:
            edit(model)
        opt.step()
    tr.close()
    return tr.to_dataframe(), tr


def test_norm_clipping_of_an_sgd_family_step_is_modelled_with_its_scale():
    clip = lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    df, tr = _run(model, opt, 4, edit=clip)
    assert df["update_modelled"].all()
    assert (df["grad_scale"] < 1).all() and (df["grad_scale"] > 0).all()
    assert df["update_note"].str.contains("times c =").all()
    for layer in tr.layers:  # the model describes the clipped update: first order exact
        np.testing.assert_allclose(df[f"realised_drift/{layer.name}"], df[f"drift/{layer.name}"], rtol=1e-9)
        np.testing.assert_allclose(df[f"realised_curvature/{layer.name}"],
                                   df[f"noise_curvature/{layer.name}"] + df[f"step_curvature/{layer.name}"],
                                   rtol=1e-7)
    # against the same run unclipped: the drift moves with c (it is not the unclipped number)
    model2 = _mlp()
    df2, _ = _run(model2, torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9), 1)
    name = tr.layers[0].name
    assert math.isclose(df[f"drift/{name}"][0], df["grad_scale"][0] * df2[f"drift/{name}"][0], rel_tol=1e-9)
    sdelip.predict(df)  # modelled: the prediction runs


def test_edits_the_rules_cannot_follow_are_flagged_and_refused_by_name():
    model = _mlp()
    df, _ = _run(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 3, edit=lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 1e-3))
    assert not df["update_modelled"].any() and df["grad_scale"].isna().all()
    assert df["update_note"].str.contains("not a multiple of the tracked gradient").all()
    coefficients = [c for c in df if c.startswith(("drift/", "noise_curvature/", "diffusion_sq/", "step_curvature/"))]
    assert coefficients and df[coefficients + ["drift_Z", "noise_curvature_Z"]].isna().all().all()
    assert df.filter(like="realised_drift/").notna().all().all()
    with pytest.raises(UnmodelledUpdateError, match=r"steps \[0, 1, 2\].*not a multiple"):
        sdelip.predict(df)
    model = _mlp()  # Adam's noise terms depend on the gradient elementwise: a clipped step is flagged
    df, _ = _run(model, torch.optim.Adam(model.parameters(), lr=1e-2), 2,
                 edit=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3))
    assert not df["update_modelled"].any() and df["update_note"].str.contains("elementwise").all()


def test_an_optimizer_without_a_rule_gets_realised_increments_and_no_model():
    class Custom(torch.optim.SGD):  # may change step(): no inherited rule
        pass

    model = _mlp()
    with pytest.warns(NotPlainSGDWarning, match="Custom has no update rule"):
        df, tr = _run(model, Custom(model.parameters(), lr=0.1), 3)
    meta = tr.metadata["optimizer"]
    assert meta["class"] == "Custom" and meta["rule"] is None
    name = tr.layers[0].name
    assert df[f"drift/{name}"].isna().all() and df["drift_Z"].isna().all()
    assert df[f"realised_drift/{name}"].notna().all() and df[f"K/{name}"].notna().all()
    with pytest.raises(UnmodelledUpdateError, match="Custom has no update rule"):
        sdelip.predict(df)
    with pytest.raises(UnmodelledUpdateError):
        sdelip.ReducedLipschitzSDE.from_record(df, lr=0.1)


def test_a_skipped_optimizer_step_is_flagged_and_a_closed_run_keeps_its_last_row(tmp_path):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    X, Y = _data(False)
    tr = Tracker(model, opt, record=tmp_path / "r.db")
    opt.zero_grad()
    tr.backward(F.cross_entropy(model(X[:M]), Y[:M], reduction="none"))
    opt.zero_grad()  # as GradScaler does on an overflow: no optimizer.step()
    tr.backward(F.cross_entropy(model(X[M:2 * M]), Y[M:2 * M], reduction="none"))
    opt.step()
    opt.zero_grad()
    tr.backward(F.cross_entropy(model(X[2 * M:3 * M]), Y[2 * M:3 * M], reduction="none"))
    tr.close()  # the last step's update was not observed
    df = sdelip.load_record(tmp_path / "r.db")
    assert df["update_modelled"].tolist() == [False, True, True]
    assert "was not called" in df["update_note"][0]
    name = tr.layers[0].name
    assert np.isnan(df[f"realised_drift/{name}"][0]) and np.isnan(df[f"realised_drift/{name}"][2])
    assert np.isfinite(df[f"realised_drift/{name}"][1])


def test_records_of_sdelip_0_1_with_momentum_are_not_modelled(tmp_path):
    import json
    import sqlite3

    model = _mlp()
    path = tmp_path / "old.db"
    _run(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 2)
    with Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), record=path) as tr:
        X, Y = _data(False)
        tr.backward(F.cross_entropy(model(X[:M]), Y[:M], reduction="none"))
    con = sqlite3.connect(path)  # as sdelip 0.1 wrote it: no update columns, no rule in the metadata
    con.execute("UPDATE steps SET update_modelled = NULL, grad_scale = NULL, update_note = NULL, checksum = NULL")
    meta = json.loads(con.execute("SELECT value FROM meta WHERE key = 'optimizer'").fetchone()[0])
    meta.pop("rule")
    meta.pop("clock")
    con.execute("UPDATE meta SET value = ? WHERE key = 'optimizer'", (json.dumps(meta),))
    con.commit()
    con.close()
    df = sdelip.load_record(path)
    assert not df["update_modelled"].any()
    with pytest.raises(UnmodelledUpdateError, match="sdelip 0.1 with the plain-SGD formulas"):
        sdelip.predict(df)
