"""The sdelip command line end to end on tiny data (the bundled MNIST digits)."""

import subprocess
import sys

import pandas as pd
import pytest

from sdelip.cli import main

TINY = ["--steps", "6", "--batch-size", "8", "--max-train-samples", "96", "--no-progress"]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run.db"
    assert main(["track", "--record", str(path), *TINY]) == 0
    return path


def test_track_writes_a_record(record):
    from sdelip.record import load_record

    df = load_record(record)
    assert list(df["step"]) == list(range(6))
    assert {"K", "Z", "drift_Z", "noise_curvature_Z", "diffusion_sq_Z"} <= set(df.columns)


def test_track_refuses_to_overwrite(record, capsys):
    assert main(["track", "--record", str(record), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_predict(record, tmp_path, capsys):
    csv = tmp_path / "pred.csv"
    assert main(["predict", str(record), "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "K_observed" in out and "K_mean (Thm 17)" in out
    pred = pd.read_csv(csv)
    assert len(pred) == 6 and {"K_observed", "K_mean", "K_std"} <= set(pred.columns)


def test_simulate(record, tmp_path, capsys):
    csv = tmp_path / "sim.csv"
    assert main(["simulate", str(record), "-n", "200", "--no-progress", "--csv", str(csv)]) == 0
    sim = pd.read_csv(csv)
    assert (sim["mean_K"] > 0).all() and (sim["var_K"] >= 0).all()
    assert "E[K] (MC)" in capsys.readouterr().out


def test_plot_and_info(record, tmp_path, capsys):
    png = tmp_path / "fig.png"
    assert main(["plot", str(record), "--out", str(png), "--simulate", "100"]) == 0
    assert png.stat().st_size > 10_000
    assert main(["info", str(record)]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "network" in out and "rows: 6" in out
    assert main(["info", str(record), "--json"]) == 0


def test_demo_tiny(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "8", "--batch-size", "16", "--trajectories", "300",
                 "--no-progress"]) == 0
    assert (out / "demo.png").stat().st_size > 10_000
    text = (out / "summary.md").read_text()
    assert "Thm 16–17" in text and "mlxtend" in text


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.db")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdelip: error: no record") and "Traceback" not in err
    assert main(["track", "--record", str(tmp_path / "x.db"), "--batch-size", "1", "--steps", "2",
                 "--no-progress"]) == 2
    assert "at least 2 samples" in capsys.readouterr().err


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "sdelip", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for cmd in ("demo", "track", "predict", "simulate", "plot", "info"):
        assert cmd in res.stdout
