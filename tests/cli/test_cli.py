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


def test_track_rerun_continues_and_other_options_are_refused(record, capsys):
    # the same command again continues the (finished) run from its default checkpoint: nothing to do
    assert main(["track", "--record", str(record), *TINY]) == 0
    assert "resumed at step 6" in capsys.readouterr().out
    # other options would mix two runs in one record: refused, naming --overwrite
    assert main(["track", "--record", str(record), *TINY, "--lr", "0.2"]) == 2
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


def test_track_resume_with_changed_options_is_refused_in_flags(tmp_path, capsys):
    """Killed, then rerun with other options: refused, each option named as its flag with both values."""
    from sdelip.record import load_metadata, load_record

    rec, ckpt = tmp_path / "r.db", tmp_path / "r.pt"
    args = ["track", "--record", str(rec), "--checkpoint", str(ckpt), *TINY]
    assert main([*args, "--steps", "3"]) == 0
    capsys.readouterr()
    assert main([*args, "--lr", "0.5", "--batch-size", "4", "--no-split", "--regularizer", "mixup"]) == 2
    err = capsys.readouterr().err
    for line in ("--lr 0.5 now, --lr 0.01 in the checkpoint", "--batch-size 4 now, --batch-size 8 in the checkpoint",
                 "--no-split now, without --no-split in the checkpoint",
                 "--regularizer mixup now, --regularizer none in the checkpoint", "--overwrite"):
        assert line in err
    assert "overwrite=True" not in err and "Tracker" not in err and "Traceback" not in err
    assert list(load_record(rec)["step"]) == [0, 1, 2]
    # the same options continue the run, and the summary covers all of it
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 steps (resumed at step 3)" in out and "final loss nan" not in out
    assert list(load_record(rec)["step"]) == list(range(6)) and load_metadata(rec)["resumed_at"] == [3]


def test_track_overwrite_works_with_checkpoint_and_messages_name_flags(tmp_path, capsys):
    from sdelip.record import load_metadata, load_record

    rec, ckpt = tmp_path / "r.db", tmp_path / "r.pt"
    assert main(["track", "--record", str(rec), "--checkpoint", str(ckpt), *TINY, "--steps", "3"]) == 0
    assert main(["track", "--record", str(rec), "--checkpoint", str(ckpt), *TINY, "--overwrite", "--lr", "0.2"]) == 0
    df, meta = load_record(rec), load_metadata(rec)
    assert list(df["step"]) == list(range(6)) and (df["lr"] == 0.2).all()
    assert meta["lr"] == 0.2 and "resumed_at" not in meta
    capsys.readouterr()
    # an existing record whose checkpoint is missing: the message names the flags
    assert main(["track", "--record", str(rec), "--checkpoint", str(tmp_path / "nope.pt"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err and "Tracker.resume" not in err
    assert main(["track", "--record", str(rec), *TINY]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--checkpoint FILE" in err


def test_every_resume_option_has_a_flag():
    """The options a resumed run must keep are spelled as flags (or said to have none)."""
    import attrs

    from sdelip.cli import cli_option
    from sdelip.workbench.train import RESUME_FREE_OPTIONS, TrainConfig

    assert "tracking" in {f.name for f in attrs.fields(TrainConfig)}  # spelled flat: track_every, engine, ...
    for name, default in TrainConfig().to_flat().items():
        spelled = cli_option(name, default)
        if name in ("sampling", "track", "eval_test", "gap_tol", "on_degenerate"):
            assert "no command-line flag" in spelled
        elif name not in RESUME_FREE_OPTIONS or name in ("steps", "checkpoint", "overwrite"):
            assert spelled.startswith(("--", "without --")), (name, spelled)
