"""Records: SQLite round trip, the column contract, modes, truncation, concurrent reads."""

import math
import sqlite3

import numpy as np
import pandas as pd
import pytest

from sdelip.record import (
    LAYER_QUANTITIES,
    NETWORK_QUANTITIES,
    RecordExistsError,
    RecordWriter,
    StepRecord,
    load_layers,
    load_metadata,
    load_probes,
    load_record,
    records_equal,
)

LAYERS = [("features.conv1", "Conv2d", (32, 27)), ("classifier.fc", "Linear", (10, 256))]


def make_step(k, split=True, probes=None, degenerate=False):
    rng = np.random.default_rng(k)
    layers = {}
    for name, _, _ in LAYERS:
        v = rng.standard_normal(7)
        layers[name] = {
            "K": 1.0 + abs(v[0]), "drift": v[1], "noise_curvature": abs(v[2]),
            "noise_curvature_var": abs(v[3]) if split else None,
            "noise_curvature_cov": v[4] if split else None,
            "diffusion_sq": abs(v[5]) / 3.0, "gap": abs(v[6]) / 10, "step_curvature": v[0] / 7,
            "degenerate": degenerate and name == "classifier.fc",
        }
    Z = sum(math.log(q["K"]) for q in layers.values())
    network = {
        "Z": Z, "K": math.exp(Z), "drift_Z": sum(q["drift"] for q in layers.values()),
        "noise_curvature_Z": sum(q["noise_curvature"] for q in layers.values()),
        "diffusion_sq_Z": sum(q["diffusion_sq"] for q in layers.values()),
        "noise_curvature_var_Z": sum(q["noise_curvature_var"] for q in layers.values()) if split else None,
        "noise_curvature_cov_Z": sum(q["noise_curvature_cov"] for q in layers.values()) if split else None,
        "step_curvature_Z": sum(q["step_curvature"] for q in layers.values()),
    }
    return StepRecord(step=k, t=k * 0.01, lr=0.01, loss=1.0 / (k + 1), batch_size=128, layers=layers,
                      network=network, degenerate=degenerate, probes=probes)


def test_round_trip_is_bitwise_and_columns_follow_the_contract(tmp_path):
    path = tmp_path / "r.db"
    steps = [make_step(k, degenerate=(k == 2)) for k in range(5)]
    with RecordWriter(path, LAYERS, {"lr": 0.01, "engine": "factored", "shape": (3, 4)}) as w:
        for s in steps:
            w.write(s)
    df = load_record(path)
    names = [n for n, _, _ in LAYERS]
    expected = ["step", "t", "lr", "loss", "batch_size"]
    expected += [f"{q}/{n}" for q in LAYER_QUANTITIES + ("degenerate",) for n in names]
    expected += list(NETWORK_QUANTITIES) + ["degenerate", "grad_scale", "update_modelled", "update_note"]
    assert list(df.columns) == expected
    for q in ("K", "drift", "noise_curvature", "noise_curvature_var", "noise_curvature_cov", "diffusion_sq", "gap"):
        for n in names:
            assert f"{q}/{n}" in df.columns
    for c in ("Z", "K", "drift_Z", "noise_curvature_Z", "diffusion_sq_Z"):
        assert c in df.columns
    assert df["step"].tolist() == list(range(5)) and df["step"].dtype == np.int64
    for k, s in enumerate(steps):
        row = s.as_row()
        for c in df.columns:
            a, b = df[c][k], row[c]
            assert a == b or (isinstance(b, float) and np.isnan(a) and np.isnan(b)), (c, a, b)
    assert df["degenerate/classifier.fc"].tolist() == [False, False, True, False, False]
    assert df["degenerate"].dtype == bool
    meta = load_metadata(path)
    assert meta == {"lr": 0.01, "engine": "factored", "shape": [3, 4]}
    assert load_layers(path) == [(n, k, s) for n, k, s in LAYERS]
    assert steps[0].get("K") == steps[0]["K"] == steps[0].network["K"]


def test_split_off_gives_nan_and_probes_are_columns(tmp_path):
    path = tmp_path / "p.db"
    w = RecordWriter(path, LAYERS)
    w.write(make_step(0, split=False, probes={"lipschitz_lower": 0.5, "conv_opnorm/features.conv1": 2.0}))
    w.write(make_step(1, split=False))
    w.write_probes(2, {"lipschitz_lower": 0.7})
    w.close()
    df = load_record(path)
    assert df["noise_curvature_var/features.conv1"].isna().all() and df["noise_curvature_cov_Z"].isna().all()
    assert df["lipschitz_lower"].tolist()[0] == 0.5 and np.isnan(df["lipschitz_lower"][1])
    assert len(df) == 2  # probes of untracked steps are not rows of the record …
    pr = load_probes(path)
    assert pr["step"].tolist() == [0, 2] and pr["lipschitz_lower"].tolist() == [0.5, 0.7]  # … but are kept


def test_modes_and_truncate(tmp_path):
    path = tmp_path / "m.db"
    w = RecordWriter(path, LAYERS, {"a": 1})
    for k in range(4):
        w.write(make_step(k))
    with pytest.raises(sqlite3.IntegrityError):  # a step is written once
        w.write(make_step(3))
    assert w.last_step() == 3
    w.close()
    with pytest.raises(RecordExistsError, match="4 step"):
        RecordWriter(path, LAYERS)
    with pytest.raises(ValueError, match="tracks layers"):
        RecordWriter(path, LAYERS[:1], mode="append")
    w = RecordWriter(path, LAYERS, {"a": 2, "b": 3}, mode="append")
    assert w.metadata() == {"a": 1, "b": 3}  # append keeps the original metadata
    assert w.truncate(2) == 2
    w.write(make_step(2))
    w.close()
    assert load_record(path)["step"].tolist() == [0, 1, 2]
    w = RecordWriter(path, LAYERS[:1], {"c": 1}, mode="overwrite")
    w.close()
    assert len(load_record(path)) == 0 and load_metadata(path) == {"c": 1}
    with pytest.raises(FileNotFoundError):
        load_record(tmp_path / "missing.db")
    with pytest.raises(ValueError):
        RecordWriter(tmp_path / "x.db", LAYERS, mode="replace")


def test_each_step_is_committed_and_readable_while_writing(tmp_path):
    path = tmp_path / "c.db"
    w = RecordWriter(path, LAYERS)
    for k in range(3):
        w.write(make_step(k))
        # another connection sees every committed step immediately
        assert load_record(path)["step"].tolist() == list(range(k + 1))
    # an empty record still has every column
    empty = RecordWriter(tmp_path / "e.db", LAYERS)
    df = load_record(tmp_path / "e.db")
    assert len(df) == 0 and "K/features.conv1" in df.columns and "Z" in df.columns
    empty.close()
    w.close()


def test_records_equal(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    for p in (a, b):
        with RecordWriter(p, LAYERS) as w:
            for k in range(3):
                w.write(make_step(k))
    assert records_equal(a, b)
    df = load_record(b)
    df.loc[1, "drift_Z"] += 1e-15
    assert not records_equal(a, df) and records_equal(a, df, rtol=1e-12)
    assert not records_equal(a, df.iloc[:2])
    assert isinstance(load_record(a), pd.DataFrame)


def test_records_from_before_the_step_curvature_column_still_load_and_append(tmp_path):
    path = tmp_path / "old.db"
    with RecordWriter(path, LAYERS, {"lr": 0.01}) as w:
        w.write(make_step(0))
    con = sqlite3.connect(path)  # rebuild the tables without the added columns, as an old file had them
    for table, col in (("steps", "step_curvature_Z"), ("layer_steps", "step_curvature"), ("steps", "diverged"),
                       ("steps", "checksum"), ("layer_steps", "checksum"), ("probes", "checksum")):
        con.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
    con.commit()
    con.close()
    old = load_record(path)
    assert np.isnan(old["step_curvature_Z"][0]) and np.isnan(old["step_curvature/classifier.fc"][0])
    assert old["drift_Z"][0] == make_step(0).network["drift_Z"]
    with RecordWriter(path, LAYERS, {"lr": 0.01}, mode="append") as w:
        w.write(make_step(1))
    df = load_record(path)
    assert df["step"].tolist() == [0, 1]
    assert df["step_curvature_Z"][1] == make_step(1).network["step_curvature_Z"]
