"""DistributedTracker: a 2-process gloo run's record equals the single-process record of the same global batch."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sdelip.record import load_record

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS, M, WORLD = 4, 8, 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, M, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (STEPS, M), generator=g)


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=0.01)


def _single(path, kind):
    from sdelip.tracking.tracker import Tracker

    model = _model()
    opt = _optimizer(kind, model.parameters())
    X, Y = _data()
    with Tracker(model, opt, record=path) as tracker:
        for x, y in zip(X, Y):
            opt.zero_grad()
            tracker.backward(F.cross_entropy(model(x), y, reduction="none"))
            opt.step()
    return model


def _worker(rank, folder, kind):
    from sdelip.integrations.distributed import DistributedTracker

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    try:
        ddp = nn.parallel.DistributedDataParallel(_model())
        opt = _optimizer(kind, ddp.parameters())
        X, Y = _data()
        share = slice(rank * M // WORLD, (rank + 1) * M // WORLD)  # rank 0 holds the first half
        tracker = DistributedTracker(ddp, opt, record=os.path.join(folder, "ddp.db"))
        for x, y in zip(X, Y):
            opt.zero_grad()
            tracker.backward(F.cross_entropy(ddp(x[share]), y[share], reduction="none"))
            opt.step()
        tracker.close()
        torch.save({k: v.detach() for k, v in ddp.module.state_dict().items()}, os.path.join(folder, f"w{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _compare(a, b):
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b) == STEPS
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype.kind in "fc":
            np.testing.assert_allclose(x.astype(float), y.astype(float), rtol=1e-10, atol=1e-12, err_msg=c)
        else:
            assert (x == y).all(), c


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_ddp_record_equals_single_process(tmp_path, kind):
    single = _single(tmp_path / "single.db", kind)
    mp.spawn(_worker, args=(str(tmp_path), kind), nprocs=WORLD, join=True)
    _compare(load_record(tmp_path / "ddp.db"), load_record(tmp_path / "single.db"))
    for r in range(WORLD):  # the training itself is the single-process one
        w = torch.load(tmp_path / f"w{r}.pt")
        for k, v in single.state_dict().items():
            torch.testing.assert_close(w[k], v, rtol=1e-12, atol=1e-12)
    assert not (tmp_path / "ddp.db-journal").exists()


def test_needs_a_process_group():
    from sdelip.errors import DistributedTrackingError
    from sdelip.integrations.distributed import DistributedTracker

    model = _model()
    with pytest.raises(DistributedTrackingError, match="init_process_group"):
        DistributedTracker(model, torch.optim.SGD(model.parameters(), lr=0.1))
