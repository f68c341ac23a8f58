"""SdelipCallback: a real lightning.Trainer fit (CPU) gives the record of the same training in a bare loop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning", reason="Lightning is not installed (pip install 'sdelip[integrations]')")

from sdelip.errors import IntegrationError, PerSampleLossError, UnsupportedPrecisionError  # noqa: E402
from sdelip.integrations.lightning import SdelipCallback  # noqa: E402
from sdelip.record import load_record  # noqa: E402
from sdelip.tracking.tracker import Tracker  # noqa: E402

N, B = 16, 4


class Net(L.LightningModule):
    def __init__(self, clip=None, returns="losses", scheduler=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        self.returns = returns
        self.scheduler = scheduler
        self.seen = []  # the batches Lightning fed, in order

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.clone(), y.clone()))
        losses = F.cross_entropy(self(x), y, reduction="none")
        if self.returns == "loss":
            return losses.mean()
        if self.returns == "wrong-mean":
            return {"losses": losses, "loss": losses.sum()}
        return {"losses": losses}

    def validation_step(self, batch, batch_idx):  # forward passes without gradients between tracked steps
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        if self.scheduler:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def _data():
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=B, shuffle=False)


def _trainer(max_steps, callbacks, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def _bare(path, steps, clip=None, batches=None, scheduler=False):
    """The same training in a plain loop (on ``batches``, default the loader's for ``steps`` steps)."""
    module = Net(scheduler=scheduler)
    opt = module.configure_optimizers()
    sched = None
    if scheduler:
        opt, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    if batches is None:
        batches = [b for _ in range(steps) for b in _data()][:steps]
    with Tracker(module, opt, record=path) as tracker:
        for i, batch in enumerate(batches):
            opt.zero_grad()
            tracker.backward(module.training_step(batch, i)["losses"])
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            opt.step()
            if sched is not None:
                sched.step()
    return load_record(path)


def _equal(a, b):
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14, err_msg=c)
        else:
            assert list(x) == list(y), c


@pytest.mark.parametrize("clip", [None, 0.05])
def test_fit_equals_bare_loop(tmp_path, clip):
    steps = 6  # 1.5 epochs
    cb = SdelipCallback(record=tmp_path / "pl.db")
    _trainer(steps, [cb], gradient_clip_val=clip).fit(Net(), _data())
    got, want = load_record(tmp_path / "pl.db"), _bare(tmp_path / "bare.db", steps, clip)
    _equal(got, want)
    assert got["update_modelled"].all() and len(got) == steps
    if clip is not None:  # Lightning's clipping is seen and modelled (SGD with a uniform scale)
        assert (got["grad_scale"] < 1).any()


def test_fit_with_a_step_scheduler_equals_bare_loop(tmp_path):
    _trainer(6, [SdelipCallback(record=tmp_path / "pl.db")], val_check_interval=2).fit(Net(scheduler=True), _data(),
                                                                                       _data())
    got = load_record(tmp_path / "pl.db")
    _equal(got, _bare(tmp_path / "bare.db", 6, scheduler=True))
    assert list(got["lr"]) == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


def test_checkpoint_resume_and_loggers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from sdelip.tracking.options import RecordOptions

    # a run of one epoch (4 steps) saves a checkpoint; a continuation of it (interrupted after step 5) wrote two
    # more rows (a checkpoint belongs to its record: the continuation appends to the same record)
    trainer = _trainer(-1, [SdelipCallback(record=tmp_path / "pl.db")], max_epochs=1)
    first = Net()
    trainer.fit(first, _data())
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    _trainer(6, [SdelipCallback(record=tmp_path / "pl.db")]).fit(Net(), _data(), ckpt_path=ckpt)
    assert len(load_record(tmp_path / "pl.db")) == 6
    # a new run that overwrites the record cannot be continued from the first run's checkpoint
    _trainer(2, [SdelipCallback(record=RecordOptions(tmp_path / "other.db", mode="overwrite"))]).fit(Net(), _data())
    # resumed from the epoch-end checkpoint (step 4): rows 4, 5 are replaced, the record goes on to step 8
    logger = CSVLogger(tmp_path, name="logs")
    cb = SdelipCallback(record=tmp_path / "pl.db")
    resumed = Net()
    _trainer(8, [cb], logger=logger).fit(resumed, _data(), ckpt_path=ckpt)
    got = load_record(tmp_path / "pl.db")
    # Lightning 2.6 feeds the loader's first batch again right after such a resume (its own replay of a
    # non-resumable loader): the record is that of the batches actually trained on
    _equal(got, _bare(tmp_path / "bare.db", 8, batches=first.seen + resumed.seen))
    assert cb.tracker.metadata["resumed_at"] == [4, 4]  # both continuations resumed from step 4
    import pandas as pd

    logged = pd.read_csv(next((tmp_path / "logs").rglob("metrics.csv")))
    rows = logged.dropna(subset=["sdelip/K"])
    assert list(rows["step"]) == [4, 5, 6, 7]
    np.testing.assert_allclose(rows["sdelip/K"], got["K"][4:], rtol=1e-12)
    assert set(rows["sdelip/update_modelled"]) == {1.0}


def test_refusals(tmp_path):
    with pytest.raises(UnsupportedPrecisionError, match="bf16-mixed"):
        _trainer(2, [SdelipCallback()], precision="bf16-mixed").fit(Net(), _data())
    with pytest.raises(IntegrationError, match="accumulate_grad_batches"):
        _trainer(2, [SdelipCallback()], accumulate_grad_batches=2).fit(Net(), _data())
    with pytest.raises(PerSampleLossError, match="'losses'"):
        _trainer(2, [SdelipCallback()]).fit(Net(returns="loss"), _data())
    with pytest.raises(PerSampleLossError, match="not the mean"):
        _trainer(2, [SdelipCallback()]).fit(Net(returns="wrong-mean"), _data())
