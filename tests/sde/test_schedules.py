"""Learning-rate schedules in every simulation path (issue 29): a StepLR record is simulated on its own
η(t) — the record's t column as the time grid, each step's coefficients over its own Δt — and one η for
it is refused, the same way in Python and on the command line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sdelip.analysis.prediction import predict
from sdelip.cli import main
from sdelip.errors import LearningRateScheduleError
from sdelip.record import load_record
from sdelip.sde import ReducedLipschitzSDE, record_step_sizes, simulate_record

from scheduled_runs import steplr_record

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def steplr(tmp_path_factory):
    return steplr_record(tmp_path_factory.mktemp("schedule") / "steplr.db")  # 30 steps, η 0.2 → 0.02 → 0.002


def test_step_sizes_follow_the_record(steplr):
    df = load_record(steplr)
    sizes = record_step_sizes(df)
    np.testing.assert_allclose(sizes, [0.2] * 10 + [0.02] * 10 + [0.002] * 10, rtol=1e-9)
    np.testing.assert_allclose(np.cumsum(sizes)[:-1], df["t"].to_numpy()[1:], rtol=1e-9)
    const = df.assign(lr=0.2, t=0.2 * df["step"])
    assert record_step_sizes(const) is None  # one η: the uniform system of before
    sde = ReducedLipschitzSDE.from_record(df)
    assert sde.scheduled and sde.dt == pytest.approx(0.2)
    np.testing.assert_allclose(sde.step_times()[:-1], df["t"], rtol=1e-9)


def test_simulation_mean_matches_thm17_of_predict(steplr):
    """E[K(T)] of the Monte Carlo against predict's Thm 17 mean on the same StepLR record."""
    df = load_record(steplr)
    pred = predict(df)
    n = 4000
    res = simulate_record(df, n=n, every=1, seed=3, progress=False)
    t_pred = pred["t"].to_numpy()
    # the simulation's times are the record's: t runs to t_last + η_last = 2.22, not 30·η0 = 6
    np.testing.assert_allclose(res.t[:-1], t_pred, rtol=1e-9, atol=1e-12)
    assert res.t[-1] == pytest.approx(t_pred[-1] + 0.002)
    # the closed form attached to the simulation is predict's Thm 17 mean, to rounding
    np.testing.assert_allclose(res.theory.mean_K[:-1], pred["K_mean"], rtol=1e-9)
    np.testing.assert_allclose(np.sqrt(res.theory.var_K[:-1]), pred["K_std"], rtol=1e-6, atol=1e-12)
    # Monte Carlo: within 4.5 standard errors at every save time, the end included
    assert res.mean_K[0] == pytest.approx(pred["K_mean"].iloc[0], rel=1e-6)  # K(0), in the state's float32
    se = np.sqrt(res.var_K[:-1] / n)
    z = np.abs(res.mean_K[1:-1] - pred["K_mean"].to_numpy()[1:]) / se[1:]
    assert z.max() < 4.5, z.max()
    # one η (the initial one) would have given another E[K(T)]: the check has teeth
    wrong = simulate_record(df.assign(lr=0.2, t=0.2 * df["step"]), n=n, every=1, seed=3, progress=False)
    assert abs(wrong.mean_K[-2] - pred["K_mean"].iloc[-1]) > 10 * se[-1]


def test_one_lr_for_a_schedule_is_refused_in_python_and_cli(steplr, capsys):
    df = load_record(steplr)
    with pytest.raises(LearningRateScheduleError, match="varies .*0.002 to 0.2.*lr="):
        simulate_record(df, lr=0.1, n=10, progress=False)
    with pytest.raises(LearningRateScheduleError):
        ReducedLipschitzSDE.from_record(df, lr=0.2)
    assert main(["simulate", str(steplr), "--lr", "0.1", "-n", "10", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "LearningRate" not in err and "varies (0.002 to 0.2, a schedule)" in err and "--lr" in err


def test_cli_simulate_and_plot_use_the_schedule(steplr, tmp_path, capsys):
    csv = tmp_path / "sim.csv"
    assert main(["simulate", str(steplr), "-n", "300", "--no-progress", "--csv", str(csv)]) == 0
    sim = pd.read_csv(csv)
    pred = predict(load_record(steplr))
    assert sim["t"].iloc[-1] == pytest.approx(pred["t"].iloc[-1] + 0.002)  # not 30 · 0.2
    K_end = sim["mean_K"].iloc[-2]
    assert abs(K_end - pred["K_mean"].iloc[-1]) < 5 * np.sqrt(sim["var_K"].iloc[-2] / 300)
    png = tmp_path / "plot.png"
    assert main(["plot", str(steplr), "--out", str(png), "--simulate", "-n", "200", "--no-progress"]) == 0
    assert png.stat().st_size > 10_000
