"""Degenerate steps under faults (issue 18): reported, and never silently driving info, predict or simulate."""

import sqlite3

import torch
from torch import nn

from sdelip.cli import main
from sdelip.record import load_record
from sdelip.tracking.options import TrackingOptions
from sdelip.tracking.tracker import Tracker

from faults import tracked_steps


# ---------------------------------------------------------------------------------------------------------------
# 5. degenerate steps are reported and never silently drive info, predict or simulate
def test_degenerate_steps_are_reported_and_kept_out(tmp_path, capsys):
    from sdelip.analysis.prediction import predict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    nn.init.orthogonal_(model[0].weight)  # σ1 = σ2: spectral gap 0 at step 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = tmp_path / "r.db"
    tr = Tracker(model, opt, record=rec, options=TrackingOptions(on_degenerate="ignore"))
    tracked_steps(tr, model, opt, 12)
    tr.close()
    df = load_record(rec)
    bad = df.loc[df["degenerate"], "step"].tolist()
    assert bad and bad[0] == 0
    # make the undefined terms of the flagged steps absurd, as a clamped gap can: they must not matter
    con = sqlite3.connect(rec)
    # (checksum = NULL: rows edited on purpose, read unchecked as rows of older records; issue 28)
    con.execute("UPDATE steps SET noise_curvature_Z = 1e3, checksum = NULL WHERE degenerate = 1")
    con.execute("UPDATE layer_steps SET noise_curvature = 1e3, checksum = NULL WHERE degenerate = 1")
    con.commit()
    con.close()
    df = load_record(rec)
    regular = df[~df["degenerate"]]
    pred = predict(df)
    assert pred.attrs["degenerate_steps"] == bad and pred["step"].iloc[0] == regular["step"].iloc[0]
    assert pred["K_mean"].max() < 10 * df["K"].max()  # the 1e3 would give e^(1e3 t)
    assert predict(df, degenerate="include")["K_mean"].iloc[-1] > 1e3 * df["K"].iloc[-1]
    for cmd in (["info", str(rec)], ["predict", str(rec)], ["simulate", str(rec), "-n", "50", "--no-progress"]):
        assert main(cmd) == 0
        out = capsys.readouterr()
        text = out.out + out.err
        assert f"{len(bad)} of {len(df)} steps are degenerate" in text or f"degenerate steps: {len(bad)}" in text, text
        if cmd[0] == "info":
            assert "leave them out" in text and "1000" not in text and "1e+03" not in text
        if cmd[0] == "simulate":
            assert "not used by the simulation" in text
            k = [ln for ln in out.out.splitlines() if ln.strip()][-1].split()  # last row: t, E[K] ...
            assert float(k[1]) < 10 * df["K"].max()
