"""Thm 16–17 prediction from records: closed forms, sparse schedules, a real run."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdelip.analysis.prediction import PREDICTION_COLUMNS, predict
from sdelip.record import load_record
from sdelip.tracking.tracker import Tracker


def synthetic(steps, t, mu, kappa, lam2, K0=3.0):
    n = len(steps)
    Z = np.full(n, math.log(K0))
    return pd.DataFrame({
        "step": steps, "t": t, "Z": Z, "K": np.exp(Z),
        "drift_Z": np.full(n, mu), "noise_curvature_Z": np.full(n, kappa), "diffusion_sq_Z": np.full(n, lam2),
    })


def test_constant_coefficients_match_closed_forms():
    eta, mu, kappa, lam2, K0 = 0.01, -0.3, 0.05, 0.2, 3.0
    steps = np.arange(200)
    df = synthetic(steps, steps * eta, mu, kappa, lam2, K0)
    pred = predict(df)
    assert list(pred.columns) == list(PREDICTION_COLUMNS)
    t = steps * eta
    np.testing.assert_allclose(pred["Z_path"], math.log(K0) + (mu + kappa - 0.5 * lam2) * t, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pred["Z_mean"], pred["Z_path"], rtol=0, atol=0)
    np.testing.assert_allclose(pred["K_path"], np.exp(pred["Z_path"]), rtol=1e-14)
    np.testing.assert_allclose(pred["Z_std"], np.sqrt(lam2 * t), rtol=1e-12, atol=1e-15)
    Kmean = K0 * np.exp((mu + kappa) * t)
    np.testing.assert_allclose(pred["K_mean"], Kmean, rtol=1e-12)
    np.testing.assert_allclose(pred["K_std"], Kmean * np.sqrt(np.expm1(lam2 * t)), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pred["K_observed"], K0)


def test_sparse_schedule_integrates_over_the_actual_spacing():
    eta = 0.1
    steps = np.array([0, 1, 2, 5, 10, 30])
    t = steps * eta
    mu = np.array([0.1, -0.2, 0.3, 0.05, -0.1, 9.9])  # the last coefficient is never used
    lam2 = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 9.9])
    df = pd.DataFrame({"step": steps, "t": t, "Z": np.zeros(6), "K": np.ones(6), "drift_Z": mu,
                       "noise_curvature_Z": np.zeros(6), "diffusion_sq_Z": lam2})
    pred = predict(df.sample(frac=1.0, random_state=0))  # order of rows does not matter
    dt = np.diff(t)
    expect = np.concatenate([[0.0], np.cumsum((mu[:-1] - 0.5 * lam2[:-1]) * dt)])
    np.testing.assert_allclose(pred["Z_path"], expect, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(pred["Z_std"] ** 2, np.concatenate([[0.0], np.cumsum(lam2[:-1] * dt)]), rtol=1e-13)
    # starting later re-anchors on the observed value there
    late = predict(df, start_step=5)
    assert late["step"].tolist() == [5, 10, 30] and late["Z_path"].iloc[0] == 0.0


def test_prediction_errors():
    df = synthetic(np.arange(3), np.arange(3) * 0.1, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="lacks"):
        predict(df.drop(columns=["diffusion_sq_Z"]))
    with pytest.raises(ValueError, match="no tracked step"):
        predict(df, start_step=10)
    bad = df.copy()
    bad.loc[2, "t"] = 0.1
    with pytest.raises(ValueError, match="increase"):
        predict(bad)
    one = predict(df.iloc[:1])
    assert len(one) == 1 and one["K_std"][0] == 0.0


def test_real_run_z_path_is_z0_plus_cumulative_sums(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    path = tmp_path / "run.db"
    tr = Tracker(model, opt, record=path, schedule=2)
    g = torch.Generator().manual_seed(0)
    for k in range(12):
        x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        tr.backward(F.cross_entropy(model(x), y, reduction="none"))
        opt.step()
    tr.close()
    rec = load_record(path)
    pred = predict(path)
    assert pred["step"].tolist() == list(range(0, 12, 2))
    # independent recomputation: Z0 + Σ_{j<k} (μ_Z + κ_Z − ½λ_Z²)_j · (t_{j+1} − t_j)
    z = [rec["Z"][0]]
    v = [0.0]
    m = [rec["K"][0]]
    for j in range(len(rec) - 1):
        dt = rec["t"][j + 1] - rec["t"][j]
        z.append(z[-1] + (rec["drift_Z"][j] + rec["noise_curvature_Z"][j] - 0.5 * rec["diffusion_sq_Z"][j]) * dt)
        v.append(v[-1] + rec["diffusion_sq_Z"][j] * dt)
        m.append(m[-1] * math.exp((rec["drift_Z"][j] + rec["noise_curvature_Z"][j]) * dt))
    np.testing.assert_allclose(pred["Z_path"], z, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pred["Z_std"], np.sqrt(v), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pred["K_mean"], m, rtol=1e-12)
    np.testing.assert_allclose(pred["K_observed"], rec["K"], rtol=0)
    np.testing.assert_allclose(pred["Z_observed"], rec["Z"], rtol=0)
    np.testing.assert_allclose(pred["t"], np.arange(0, 12, 2) * 0.2, rtol=1e-13)


def test_discrete_step_drift_is_added_when_recorded():
    eta, mu, kappa, lam2, sc, K0 = 0.01, 0.2, 0.05, 0.1, 0.03, 2.0
    steps = np.arange(50)
    df = synthetic(steps, steps * eta, mu, kappa, lam2, K0)
    assert "K_mean_discrete" not in predict(df).columns
    df["step_curvature_Z"] = sc
    pred = predict(df)
    np.testing.assert_allclose(pred["K_mean_discrete"], K0 * np.exp((mu + kappa + sc) * steps * eta), rtol=1e-12)
