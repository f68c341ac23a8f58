"""A row recomputed at optimizer.step() (a clipped step) keeps its own SDE time t_k = Σ_{j<k} η_j."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdelip.tracking.tracker import Tracker


def test_clipped_rows_keep_their_time():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(model.parameters(), lr=0.01)):
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        with Tracker(model, opt) as tracker:
            for _ in range(4):
                x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
                opt.zero_grad()
                tracker.backward(F.cross_entropy(model(x), y, reduction="none"))
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # every step clipped: the row is recomputed
                opt.step()
                sched.step()
        df = tracker.to_dataframe()
        assert (df["grad_scale"] < 1).all()
        np.testing.assert_allclose(df["t"], np.concatenate([[0.0], np.cumsum(df["lr"])[:-1]]), rtol=1e-12)
