"""Smoke tests of the sweep experiments (Fig 6, Fig 7, Sec 8.2) and of experiments/run_all.

Each script's ``main`` runs at ``--tiny`` scale into a temporary folder; the tests check
that the figure and the CSV / Markdown tables exist, with the expected columns and finite
numbers. The numbers themselves are not meaningful at this scale.
"""

from __future__ import annotations

import csv
import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _script(name: str):
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module(name)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _finite(rows, cols):
    for r in rows:
        for c in cols:
            assert math.isfinite(float(r[c])), (c, r[c])


def _check_outputs(out: Path, figure: str, columns: list[str]) -> list[dict]:
    assert (out / figure).stat().st_size > 0
    md = (out / "summary.md").read_text()
    assert "Scale: tiny" in md
    rows = _read_csv(out / "summary.csv")
    assert rows
    missing = [c for c in columns if c not in rows[0]]
    assert not missing, missing
    return rows


def test_init_scaling_tiny(tmp_path):
    mod = _script("init_scaling")
    res = mod.main(["--tiny", "--out", str(tmp_path)])
    rows = _check_outputs(tmp_path, "init_scaling.png",
                          ["model", "scheme", "K0_pred", "K0_mean", "K0_sd", "ratio_mean", "ratio_sd"])
    _finite(rows, ["K0_pred", "K0_mean", "ratio_mean", "ratio_sd"])
    assert {r["scheme"] for r in rows} == {"default", "kaiming", "normal(0.05)"}
    for r in rows:  # the Bai–Yin edge is approached from below and within a factor of two here
        assert 0.5 < float(r["ratio_mean"]) < 1.5
    layers = _read_csv(tmp_path / "layers.csv")
    _finite(layers, ["sigma1_pred", "sigma1_mean", "ratio_mean"])
    assert "Data: none" in res["md"].read_text()


def test_init_scaling_sigma1_and_scheme_std():
    import torch

    mod = _script("init_scaling")
    W = torch.randn(7, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert mod.sigma1(W) == pytest.approx(float(torch.linalg.matrix_norm(W, ord=2)), rel=1e-10)
    assert mod.sigma1(W.T) == pytest.approx(mod.sigma1(W), rel=1e-10)
    assert mod.scheme_std("default", 300) == pytest.approx(1 / math.sqrt(900))
    assert mod.scheme_std("kaiming", 50) == pytest.approx(0.2)
    # the wider-ConvNet builder reproduces the paper ConvNet's layer shapes at the paper widths
    from sdelip.workbench.models import ConvNet

    ref = [p.shape for p in ConvNet(3, 10).parameters()]
    assert [p.shape for p in mod.conv_net(3, 10).parameters()] == ref


def test_fig6_tiny(tmp_path):
    mod = _script("fig6_noisy_gradient")
    mod.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    rows = _check_outputs(tmp_path, "fig6_noisy_gradient.png",
                          ["noise", "rho", "K0", "K_end", "log_K_end_over_K0", "K_pred_eq26", "K_pred_eq26_cal"])
    _finite(rows, ["rho", "K0", "K_end", "log_K_end_over_K0", "K_pred_eq26"])
    assert {r["noise"] for r in rows} == set(mod.NOISES)
    mono = _read_csv(tmp_path / "monotonicity.csv")
    assert {r["noise"] for r in mono} == set(mod.NOISES)
    _finite([r for r in mono if r["noise"] != "zero"], ["spearman_rho_vs_K_end"])
    assert "Data: " in (tmp_path / "summary.md").read_text()
    # rho = 0 with zero noise takes no step at all: K stays at K(0)
    still = next(r for r in rows if r["noise"] == "zero" and float(r["rho"]) == 0.0)
    assert float(still["K_end"]) == pytest.approx(float(still["K0"]), rel=1e-6)
    tracked = [r for r in _read_csv(tmp_path / "runs.csv") if r["tracked"] == "True"]
    assert tracked
    _finite(tracked, ["int_mu_Z", "int_kappa_Z", "log_ratio_sde"])


def test_fig7_tiny(tmp_path):
    mod = _script("fig7_label_corruption")
    mod.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    cols = ["eps", "K0", "K_end", "log_K_end_over_K0", "log_pred_p1", "log_pred_p2", "log_pred_split",
            "log_pred_split_cal"]
    rows = _check_outputs(tmp_path, "fig7_label_corruption.png", cols)
    _finite(rows, cols)
    md = (tmp_path / "summary.md").read_text()
    assert "Spearman" in md and "Data: " in md
    half = next(r for r in rows if float(r["eps"]) == 0.5)  # tracked at tiny scale: the per-term exponents
    assert math.isfinite(float(half["mu_ratio"])) and math.isfinite(float(half["kappa_ratio"]))


def test_fit_exponent_recovers_the_exponent():
    mod = _script("fig7_label_corruption")
    eps = [k / 10 for k in range(11)]
    for p in (1.0, 2.0, 1.5):
        fit = mod.fit_exponent(eps, [(1 - e) ** p * 0.8 for e in eps], 0.8)
        assert fit["p"] == pytest.approx(p)
        assert fit["rms_p"] == pytest.approx(0.0, abs=1e-12)


def test_run_all_runs_a_script_and_reports_timing(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "run_all"), "--scale", "tiny", "--only", "init_scaling",
         "--out-root", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[run_all] init_scaling" in proc.stdout and " ok (runs " in proc.stdout  # reduced after the sweep
    assert "[run_all] total (wall)" in proc.stdout
    assert (tmp_path / "init_scaling" / "summary.csv").exists()


def test_run_all_falls_back_to_a_subprocess_for_a_script_without_tasks(tmp_path, monkeypatch):
    import importlib.machinery
    import importlib.util
    import types

    loader = importlib.machinery.SourceFileLoader("_run_all", str(EXPERIMENTS / "run_all"))
    run_all = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(run_all)
    calls = []
    monkeypatch.setattr(run_all, "load", lambda name: types.SimpleNamespace())  # no tasks/reduce
    monkeypatch.setattr(run_all.subprocess, "call", lambda cmd, cwd, env: calls.append(cmd) or 0)
    rc = run_all.main(["--scale", "tiny", "--only", "init_scaling", "--out-root", str(tmp_path), "--threads", "1"])
    assert rc == 0 and len(calls) == 1
    assert calls[0][1:] == [str(EXPERIMENTS / "init_scaling.py"), "--tiny", "--out", str(tmp_path / "init_scaling"),
                            "--no-progress"]
