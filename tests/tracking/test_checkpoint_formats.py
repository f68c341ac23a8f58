"""The one checkpoint record (sdelip.tracking.checkpoint.Checkpoint) and the earlier formats it still reads.

A file of an earlier format is built from a new one with the layout its writer used
(``sdelip-checkpoint-2`` of ``Tracker.checkpoint``, ``sdelip-train-checkpoint-3`` of
``train``); resuming from it must give the uninterrupted run.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdelip.tracking.checkpoint import CHECKPOINT_FORMAT, LEGACY_FORMATS, CheckpointError, read_checkpoint
from sdelip.record import load_record, records_equal
from sdelip.tracking.tracker import Tracker
from sdelip.workbench.train import ResumeError, TrainConfig, train

BASE = dict(model="mlp", dataset="mnist-embedded", lr=0.05, batch_size=8, steps=6, max_train_samples=64,
            eval_test=False)


def _load(path):
    return torch.load(path, weights_only=True)


def test_train_resumes_from_an_earlier_format_file(tmp_path):
    straight = train(TrainConfig(**{**BASE, "record": str(tmp_path / "straight.db")}), progress=False)
    ckpt, rec = tmp_path / "ckpt.pt", tmp_path / "resumed.db"
    train(TrainConfig(**{**BASE, "steps": 3, "record": str(rec), "checkpoint": str(ckpt)}), progress=False)
    new = _load(ckpt)
    assert new["format"] == CHECKPOINT_FORMAT and new["writer"] == "train"
    legacy = {k: new[k] for k in ("model", "optimizer", "step", "K_initial", "options", "summary")}
    torch.save({"format": LEGACY_FORMATS["train"], **legacy}, ckpt)
    resumed = train(TrainConfig(**{**BASE, "record": str(rec), "checkpoint": str(ckpt)}), progress=False)
    assert resumed.resumed_at == 3 and resumed.K_final == straight.K_final
    assert (resumed.final_loss, resumed.train_accuracy) == (straight.final_loss, straight.train_accuracy)
    assert records_equal(load_record(rec), load_record(straight.record))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _steps(tracker, model, opt, ks):
    for k in ks:
        g = torch.Generator().manual_seed(100 + k)
        x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        tracker.backward(F.cross_entropy(model(x), y, reduction="none"))
        opt.step()


def test_tracker_resumes_from_an_earlier_format_file_and_the_writers_are_not_mixed_up(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Tracker(model, opt, record=tmp_path / "straight.db") as tr:
        _steps(tr, model, opt, range(6))
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = tmp_path / "c.pt"
    with Tracker(model, opt, record=tmp_path / "split.db") as tr:
        _steps(tr, model, opt, range(3))
        tr.checkpoint(ckpt, extra={"epoch": 1})
    new = _load(ckpt)
    tracker_state = {**new["tracker"], "step": new["step"], "options": json.loads(new["options"])}
    torch.save({"format": LEGACY_FORMATS["tracker"], "model": new["model"], "optimizer": new["optimizer"],
                "tracker": tracker_state, "rng": new["rng"], "generators": new["generators"],
                "extra": new["extra"]}, ckpt)
    assert read_checkpoint(ckpt, "tracker", "a tracker checkpoint").run == {"extra": {"epoch": 1}}
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker.resume(ckpt, model, opt)
    with tr:
        _steps(tr, model, opt, range(3, 6))
    assert records_equal(load_record(tmp_path / "split.db"), load_record(tmp_path / "straight.db"))
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())

    # a train checkpoint is not a tracker checkpoint, and the other way round
    tckpt = tmp_path / "t.pt"
    train(TrainConfig(**{**BASE, "steps": 2, "checkpoint": str(tckpt)}), progress=False)
    with pytest.raises(CheckpointError, match="not an sdelip tracker checkpoint.*sdelip.workbench.train.train"):
        read_checkpoint(tckpt, "tracker", "an sdelip tracker checkpoint")
    with pytest.raises(ResumeError):
        train(TrainConfig(**{**BASE, "checkpoint": str(ckpt)}), progress=False)
