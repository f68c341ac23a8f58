"""Smoke tests of the validation experiments (Fig 2–5, ensemble) at ``--tiny`` scale.

Each script's ``main`` runs into a temporary folder; the test checks that the figure,
the CSV and the Markdown table exist, that the table has the expected columns, that
its numbers are finite, and that the Markdown states the data used and the scale.
The numbers themselves are not meaningful at this scale.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import warnings
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, tmp_path: Path) -> tuple[dict, list[dict], str]:
    module = _load(name)
    out = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedded-data fallback notice, matplotlib glyphs
        result = module.main(["--tiny", "--out", str(out), "--no-progress"])
    assert Path(result["figure"]).is_file() and Path(result["figure"]).stat().st_size > 0
    assert (out / f"{name}.png").is_file()
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    assert csv_path.is_file() and md_path.is_file()
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert rows, "empty summary table"
    md = md_path.read_text()
    assert "Data:" in md and "Scale: tiny" in md
    return result, rows, md


def _finite(rows: list[dict], cols) -> None:
    for r in rows:
        for c in cols:
            assert c in r, f"missing column {c}"
            v = float(r[c])
            assert math.isfinite(v), f"{c} = {r[c]!r} is not finite"


def test_fig2_validation(tmp_path):
    result, rows, md = _run("fig2_validation", tmp_path)
    _finite(rows, ["mean_rel_error", "max_rel_error", "final_rel_error", "frac_within_2sd", "K_change_over_run"])
    assert {r["regularizer"] for r in rows} == set(_load("fig2_validation").SETTINGS["tiny"]["configurations"])
    assert "stand-in" in md.lower() or "not cifar" in md.lower()
    for r in rows:
        assert 0 <= float(r["frac_within_2sd"]) <= 1
        assert float(r["max_rel_error"]) >= float(r["mean_rel_error"]) >= 0


def test_fig3_near_convergence(tmp_path):
    result, rows, md = _run("fig3_near_convergence", tmp_path)
    _finite(rows, ["mean_mu", "mean_kappa", "mean_lambda2", "mean_kappa_var", "mean_kappa_cov", "cov_share",
                   "kappa_over_abs_mu"])
    assert {r["window"] for r in rows} == {"whole run", "late half"}
    assert "network" in {r["layer"] for r in rows}
    for r in rows:
        assert float(r["mean_kappa"]) >= 0 and float(r["mean_lambda2"]) >= 0
        assert 0 <= float(r["cov_share"]) <= 1
        # The Prop 6 split adds up.
        assert math.isclose(float(r["mean_kappa_var"]) + float(r["mean_kappa_cov"]), float(r["mean_kappa"]),
                            rel_tol=1e-6, abs_tol=1e-12)
    assert (tmp_path / "fig3_near_convergence" / "growth.csv").is_file()
    assert all(math.isfinite(v) for k, v in result["growth"].items() if isinstance(v, float))


def test_fig4_sampling(tmp_path):
    result, rows, md = _run("fig4_sampling", tmp_path)
    _finite(rows, ["mean_K", "sd_K", "cv_sd_over_mean", "predicted_sd_thm17"])
    for r in rows:
        assert float(r["sd_K"]) >= 0 and float(r["mean_K"]) > 0
        assert int(r["n_seeds"]) == len(_load("fig4_sampling").SETTINGS["tiny"]["seeds"])


def test_fig5_batch_size(tmp_path):
    result, rows, md = _run("fig5_batch_size", tmp_path)
    _finite(rows, ["slope_observed", "r2_observed", "slope_predicted", "C_hat_mean", "C_hat_cv_across_M"])
    detail = result["detail"]
    tiny = _load("fig5_batch_size").SETTINGS["tiny"]
    assert len(detail) == len(tiny["batch_sizes"]) * len(tiny["fixed_steps"])
    _finite(detail, ["var_K_observed", "var_K_predicted_thm17", "C_hat_prop21"])
    assert (tmp_path / "fig5_batch_size" / "by_batch_size.md").is_file()


@pytest.mark.slow
def test_ensemble_validation(tmp_path):
    """Real runs, the parameter SDE and the reduced SDE at --tiny, in-process (--workers 1)."""
    module = _load("ensemble_validation")
    out = tmp_path / "ensemble_validation"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = module.main(["--tiny", "--out", str(out), "--no-progress", "--workers", "1", "--shared-noise"])
    tiny = module.SETTINGS["tiny"]
    assert (out / "ensemble_validation.png").is_file() and (out / "three_way.png").is_file()
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    md = (out / "summary.md").read_text()
    assert "Data:" in md and "Scale: tiny" in md
    # The reduced SDE and its ablations.
    assert {r["sde"] for r in rows} == set(module.VARIANTS)
    full = [r for r in rows if r["sde"] == "full"]
    _finite(full, ["frac_in_95_band", "var_obs_over_sde", "mean_bias_in_sde_sd", "var_ratio_ci_low"])
    for r in rows:
        assert 0 <= float(r["frac_in_95_band"]) <= 1
        assert int(r["n_sde"]) == tiny["n_sde"]
        if r["sde"] == "without diffusion":  # a single path: zero variance
            assert float(r["sd_sde"]) == pytest.approx(0.0, abs=1e-12)
    # The three-way comparison: every model, scheme and reported step.
    with open(out / "three_way.csv") as fh:
        tw = list(csv.DictReader(fh))
    assert {r["model"] for r in tw} == {*module.MODELS, module.SHARED_MODEL}
    assert {r["sampling"] for r in tw} == set(module.SCHEMES)
    steps = {int(r["step"]) for r in tw}
    assert len(steps) == tiny["n_checkpoints"] and max(steps) == tiny["steps"]
    _finite(tw, ["mean_K_real", "mean_K_model", "var_K_real", "var_K_model", "var_ratio_K", "mean_logK_model",
                 "var_logK_model", "coverage_95"])
    for r in tw:
        assert 0 <= float(r["coverage_95"]) <= 1
        n_model = (module.N_SHARED_SDE["tiny"] if r["model"] == module.SHARED_MODEL else
                   tiny["n_param_sde"] if r["model"].startswith("parameter SDE") else tiny["n_sde"])
        assert int(r["n_model"]) == n_model and int(r["n_real"]) == tiny["n_runs"]
    # The parameter SDE read three ways agrees with itself: Π σ1 of the simulated parameters against the
    # Itô-integrated log K (with the step's O(η) drift) differs by the Euler error only.
    by = {(r["sampling"], r["model"], int(r["step"])): r for r in tw}
    for k in steps:
        direct = float(by[("iid", module.MODELS[0], k)]["mean_logK_model"])
        ito_sc = float(by[("iid", module.MODELS[2], k)]["mean_logK_model"])
        assert abs(direct - ito_sc) < 2e-3
    # Per layer.
    with open(out / "layers.csv") as fh:
        layers = list(csv.DictReader(fh))
    assert len({r["layer"] for r in layers}) == 3
    _finite(layers, ["mean_logK_real", "mean_logK_sde", "sd_logK_sde", "median_rel_gap_real", "sd_ito_minus_direct"])
    assert {r["sde_noise"] for r in layers} == {"layers (Assumption 3)", "shared noise"}
    # Layer correlations: the two real ensembles and the two SDEs, correlations in [-1, 1].
    with open(out / "correlations.csv") as fh:
        corr = list(csv.DictReader(fh))
    assert [r["ensemble"] for r in corr] == ["real SGD, reshuffled", "real SGD, iid", "parameter SDE",
                                             "parameter SDE, shared noise"]
    for r in corr:
        assert all(-1 - 1e-9 <= float(v) <= 1 + 1e-9 for k, v in r.items() if k.startswith("corr/"))
    assert result["three_way"] and result["layers"]


@pytest.mark.slow
def test_ensemble_validation_reshuffle_leg(tmp_path):
    """--reshuffle-only at --tiny: real reshuffled runs against the epoch-pinned SDEs (and the iid ones)."""
    module = _load("ensemble_validation")
    out = tmp_path / "ensemble_reshuffle"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = module.main(["--tiny", "--reshuffle-only", "--out", str(out), "--no-progress", "--workers", "1"])
    tiny = module.SETTINGS["tiny"]
    assert (out / "reshuffle.png").is_file() and (out / "reshuffle.json").is_file()
    assert not (out / "three_way.csv").exists()  # only the reshuffle leg was reduced
    with open(out / "reshuffle.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows} == set(module.RESHUFFLE_MODELS)
    assert {r["sampling"] for r in rows} == {"reshuffled"}
    assert len({int(r["step"]) for r in rows}) == tiny["n_checkpoints"]
    _finite(rows, ["mean_K_real", "mean_K_model", "var_K_real", "var_K_model", "var_ratio_K",
                   "mean_K_model_over_real_minus_1"])
    for r in rows:
        n_model = {module.RESHUFFLE_MODELS[0]: module.N_RESHUFFLE_SDE["tiny"],
                   module.RESHUFFLE_MODELS[1]: module.N_SHARED_SDE_RESHUFFLE_ONLY["tiny"]}.get(r["model"], tiny["n_sde"])
        assert int(r["n_model"]) == n_model and int(r["n_real"]) == tiny["n_runs"]
        # Six steps of 4,000 samples: far from an epoch's end, the models' means agree with the runs' closely.
        assert abs(float(r["mean_K_model_over_real_minus_1"])) < 0.02
    md = (out / "reshuffle.md").read_text()
    assert "EpochBrownian" in md and "no step after the first epoch" in md
    assert set(result["reshuffle"]["target"]) == set(module.RESHUFFLE_MODELS)


def test_bootstrap_var_ratio_covers_the_true_ratio():
    """Var(a)/Var(b) of Gaussian samples with a true ratio of 4: estimate and interval against the truth."""
    import numpy as np

    module = _load("ensemble_validation")
    rng = np.random.default_rng(3)
    covered, widths = 0, []
    for _ in range(40):
        a, b = rng.normal(0, 2, size=(1, 200)), rng.normal(0, 1, size=(1, 200))
        vr = module.bootstrap_var_ratio(a, b, 400, rng)
        assert vr.low[0] <= vr.ratio[0] <= vr.high[0]
        covered += vr.low[0] <= 4.0 <= vr.high[0]
        widths.append(vr.high[0] / vr.low[0])
    # 95 % nominal (percentile bootstrap of n = 200 runs a little under); 40 draws: Binomial sd ≈ 3.4 %.
    assert covered >= 32, covered
    # With b held fixed the interval is that of Var(a) alone: narrower.
    a, b = rng.normal(0, 2, size=(1, 200)), rng.normal(0, 1, size=(1, 20_000))
    vr = module.bootstrap_var_ratio(a, b, 400, rng, fixed_b=True)
    assert abs(vr.ratio[0] - 4.0) < 1.5 and vr.high[0] / vr.low[0] < np.median(widths)
