"""Live export of the tracked terms (sdelip.loggers, RuntimeOptions(loggers=...)) and ``sdelip export``:
what each logger wrote is read back — TensorBoard's event_accumulator, the CSV file, MLflow's file
store, the W&B offline run file — and compared with the tracker's rows / the record. Booleans and
text must come back as what they are, not as numbers."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdelip.cli import main
from sdelip.loggers import CSVLogger, MLflowLogger, TensorBoardLogger, WandbLogger
from sdelip.record import load_record
from sdelip.tracking import RuntimeOptions, Tracker

from scheduled_runs import steplr_record

pytestmark = pytest.mark.usefixtures("one_thread")


# -- readers --------------------------------------------------------------------------------------
def read_tensorboard(folder):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    texts = {tag.replace("/text_summary", ""): {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}
             for tag in acc.Tags()["tensors"]}
    return scalars, texts


def read_wandb(folder, wait: float = 60.0):
    """The history rows and config keys of an offline W&B run (its .wandb file: LevelDB-log records
    of wandb's protobuf Record). wandb's service process may still be writing the file after
    ``run.finish()``: read until its ``exit`` record is there."""
    import time

    deadline = time.monotonic() + wait
    while True:
        history, config, done = _read_wandb_once(folder)
        if done or time.monotonic() > deadline:
            return history, config
        time.sleep(0.2)


def _read_wandb_once(folder):
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(str(folder), "wandb", "offline-run-*", "run-*.wandb"))
    data, pos, buf, block = open(path, "rb").read(), 7, b"", 32768
    history, config, done = [], {}, False
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            what = rec.WhichOneof("record_type")
            if what == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif what == "config":
                config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
            elif what == "exit":
                done = True
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
    return history, config, done


def read_mlflow(store):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        client = MlflowClient(tracking_uri=store.resolve().as_uri())
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        assert len(runs) == 1
        run = runs[0]
        metric = lambda key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}  # noqa: E731
        meta = json.loads((store.resolve() / run.info.experiment_id / run.info.run_id / "artifacts" /
                           "metadata.json").read_text())
        return run, metric, meta
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


# -- a tracked run with every logger ----------------------------------------------------------------
def tracked_run(loggers):
    """Five tracked SGD steps of a small MLP with the given loggers; the tracker's rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with Tracker(model, opt, runtime=RuntimeOptions(loggers=loggers)) as tr:
        for k in range(5):
            x = torch.randn(12, 5, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (12,), generator=g)
            opt.zero_grad()
            tr.backward(F.cross_entropy(model(x), y, reduction="none"))
            if k != 2:  # step 2: no update — update_modelled False, with a note (a boolean and a text that change)
                opt.step()
    return pd.DataFrame([r.as_row() for r in tr.history])


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """TensorBoard and CSV (fast: about 1 s)."""
    pytest.importorskip("tensorboard")
    tmp = tmp_path_factory.mktemp("loggers")
    return tmp, tracked_run([TensorBoardLogger(tmp / "tb"), CSVLogger(tmp / "run.csv")])


@pytest.fixture(scope="module")
def live_services(tmp_path_factory):
    """MLflow (a local file store) and W&B (offline): about 10 s on the 2-core machine, their imports and
    wandb's service process."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("loggers")
    os.environ.setdefault("WANDB_SILENT", "true")
    loggers = [MLflowLogger((tmp / "mlruns").resolve().as_uri(), experiment="sdelip-test", run_name="live"),
               WandbLogger(project="sdelip-test", dir=str(tmp), mode="offline")]
    return tmp, tracked_run(loggers)


def test_live_tensorboard(live):
    tmp, rows = live
    scalars, texts = read_tensorboard(tmp / "tb")
    for col in ("K", "drift_Z", "K/0", "noise_curvature/2", "lr", "t"):
        np.testing.assert_allclose([scalars[col][s] for s in rows["step"]], rows[col], rtol=1e-6)
    assert "update_modelled" not in scalars and "degenerate" not in scalars  # booleans are not numbers
    assert texts["update_modelled"] == {0: "true", 2: "false", 3: "true"}  # at the first row and each change
    assert "optimizer.step() was not called" in texts["update_note"][2]
    assert '"model": "Sequential"' in texts["metadata"][0]


def test_live_csv(live):
    tmp, rows = live
    back = pd.read_csv(tmp / "run.csv")
    assert back["update_modelled"].dtype == bool and list(back["update_modelled"]) == [True, True, False, True, True]
    np.testing.assert_allclose(back["K/0"], rows["K/0"], rtol=1e-12)
    assert json.loads((tmp / "run.metadata.json").read_text())["model"] == "Sequential"


@pytest.mark.slow
def test_live_mlflow(live_services):
    tmp, rows = live_services
    run, metric, meta = read_mlflow(tmp / "mlruns")
    K = metric("K")
    np.testing.assert_allclose([K[s] for s in rows["step"]], rows["K"], rtol=1e-12)
    np.testing.assert_allclose(list(metric("K.0").values()), rows["K/0"], rtol=1e-12)  # "/" as "."
    assert metric("update_modelled") == {}  # a boolean is a tag, not a metric
    assert run.data.tags["update_modelled"] == "true" and run.data.tags["update_modelled.true_steps"] == "0,1,3,4"
    assert run.data.params["model"] == "Sequential" and meta["layers"][0]["name"] == "0"


@pytest.mark.slow
def test_live_wandb(live_services):
    tmp, rows = live_services
    history, config = read_wandb(tmp)
    assert [h["_step"] for h in history] == list(rows["step"])
    assert [h["update_modelled"] for h in history] == [True, True, False, True, True]  # JSON booleans
    np.testing.assert_allclose([h["K/0"] for h in history], rows["K/0"], rtol=1e-12)
    assert config["model"] == "Sequential"


# -- sdelip export ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return steplr_record(tmp_path_factory.mktemp("export") / "steplr.db", steps=12, step_size=5)


def test_export_tensorboard_and_csv(record, tmp_path):
    pytest.importorskip("tensorboard")
    df = load_record(record)
    assert main(["export", str(record), "--to", "tensorboard", "--out", str(tmp_path / "tb")]) == 0
    scalars, texts = read_tensorboard(tmp_path / "tb")
    np.testing.assert_allclose([scalars["lr"][s] for s in df["step"]], df["lr"], rtol=1e-7)
    np.testing.assert_allclose([scalars["K/2"][s] for s in df["step"]], df["K/2"], rtol=1e-6)
    assert texts["degenerate"] == {0: "false"} and texts["update_modelled"] == {0: "true"}
    assert main(["export", str(record), "--to", "csv"]) == 0  # default: beside the record
    back = pd.read_csv(str(record) + ".csv")
    assert back["degenerate"].dtype == bool
    pd.testing.assert_series_equal(back["K"], df["K"], check_exact=False, rtol=1e-12)


@pytest.mark.slow
def test_export_mlflow_and_wandb(record, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    df = load_record(record)
    assert main(["export", str(record), "--to", "mlflow", "--out", str(tmp_path / "mlruns")]) == 0
    run, metric, meta = read_mlflow(tmp_path / "mlruns")
    np.testing.assert_allclose(list(metric("drift_Z").values()), df["drift_Z"], rtol=1e-12)
    assert run.data.tags["degenerate"] == "false" and meta["optimizer"]["class"] == "SGD"
    assert main(["export", str(record), "--to", "wandb", "--out", str(tmp_path / "wb")]) == 0
    history, config = read_wandb(tmp_path / "wb")
    np.testing.assert_allclose([h["t"] for h in history], df["t"], rtol=1e-12)
    assert all(h["degenerate"] is False for h in history) and config["lr"] == 0.2


def test_export_refuses_an_unknown_target(record, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(record), "--to", "excel"])
    assert exc.value.code == 2 and "usage: sdelip export" in capsys.readouterr().err
