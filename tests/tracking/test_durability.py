"""The tracker under faults (issue 18): checkpoints loaded as data, continuation, overflow, deepcopy,
gradient accumulation, threads.

The record, CLI, sweep and prediction parts of issue 18 are in tests/record/test_record_durability.py,
tests/cli/test_cli_durability.py, tests/workbench/test_workbench_durability.py and
tests/analysis/test_analysis_durability.py; the shared helpers in tests/faults.py.
"""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdelip.record import load_record
from sdelip.tracking.checkpoint import UnsafeCheckpointError
from sdelip.tracking.tracker import CHECKPOINT_FORMAT, Tracker

from faults import TINY, tiny_model, tracked_steps, run_sdelip, write_record


# ---------------------------------------------------------------------------------------------------------------
# 2. checkpoints are loaded as data: a crafted pickle is refused and its payload never runs
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path, fmt: str) -> Path:
    torch.save({"format": fmt, "step": 0, "payload": _Payload(marker)}, path)
    return path


def test_crafted_checkpoint_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    evil = _crafted(tmp_path / "evil.pt", marker, CHECKPOINT_FORMAT)
    model = tiny_model()
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil\.pt.*posix\.system|refusing to load "
                                                     r".*evil\.pt.*system"):
        Tracker.resume(evil, model, torch.optim.SGD(model.parameters(), lr=0.1), record=tmp_path / "r.db")
    assert not marker.exists()
    tr = Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(UnsafeCheckpointError):
        tr.restore(evil)
    assert not marker.exists()
    # the training checkpoint, through the command line
    evil2 = _crafted(tmp_path / "evil2.pt", marker, "sdelip-train-checkpoint-3")
    res = run_sdelip("track", "--record", tmp_path / "t.db", "--checkpoint", evil2, "--steps", "3", *TINY)
    assert res.returncode == 2 and "refusing to load" in res.stderr and "evil2.pt" in res.stderr, res.stderr
    assert "earlier version" not in res.stderr
    assert not marker.exists()


def test_checkpoint_holds_data_only_and_round_trips(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt)
    tracked_steps(tr, model, opt, 3)
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\] is a .*Path"):
        tr.checkpoint(tmp_path / "c.pt", extra=Path("x"))
    tr.checkpoint(tmp_path / "c.pt", extra={"epoch": 1, "seen": [1, 2]})
    torch.load(tmp_path / "c.pt", weights_only=True)  # loadable as pure data
    assert tr.restore(tmp_path / "c.pt") == {"epoch": 1, "seen": [1, 2]}
    # random bytes, a truncated file and a folder are named
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02" + bytes((i * 37 + 11) % 256 for i in range(300)))  # garbage pickle
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    for name in ("junk.pt", "cut.pt"):
        with pytest.raises(ValueError, match=rf"{name}.* is not readable as an sdelip tracker checkpoint"):
            tr.restore(tmp_path / name)
    with pytest.raises(ValueError, match="is a directory"):
        tr.restore(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 6. start_step continues only the same run; a foreign SQLite file is never written
def test_start_step_refuses_changed_options_and_gaps(tmp_path):
    rec = tmp_path / "r.db"
    write_record(rec, 5)
    model = tiny_model()
    cases = [
        (dict(lr=0.2), r"lr=0.2 here, lr=0.1 in the record"),
        (dict(schedule=2), r"schedule='every 2 steps' here, schedule='every step' in the record"),
        (dict(engine="materialised", loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="none")),
         r"engine='materialised' here, engine='factored' in the record"),
        (dict(start_step=9), r"record ends at step 4, .* steps 5\.\.8 would be missing"),
    ]
    for kw, msg in cases:
        lr = kw.pop("lr", 0.1)
        kw.setdefault("start_step", 3)
        with pytest.raises(ValueError, match=msg):
            Tracker(model, torch.optim.SGD(model.parameters(), lr=lr), record=rec, **kw)
    assert load_record(rec)["step"].tolist() == [0, 1, 2, 3, 4]  # untouched
    # the same configuration continues, replacing the later rows with a notice
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"held 2 row\(s\) from step 3 on; they are replaced"):
        tr = Tracker(model, opt, record=rec, start_step=3)
    tracked_steps(tr, model, opt, 3)
    tr.close()
    assert load_record(rec)["step"].tolist() == list(range(6))


def test_overflow_of_the_trackers_own_sums_is_said(tmp_path):
    from sdelip._checks import NonFiniteError

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-40)
    tr = Tracker(model, opt)
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)) * 1e20, torch.randint(0, 3, (8,))
    losses = F.cross_entropy(model(x), y, reduction="none")
    assert bool(torch.isfinite(losses).all())
    with pytest.raises(NonFiniteError, match=r"(?s)losses are finite .*Σ g_i² overflowed.*float32.*float64"):
        tr.backward(losses)
    tr.close()
    # in float64 the same step is tracked
    model = tiny_model().double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-40)
    tr = Tracker(model, opt)
    rec = tr.backward(F.cross_entropy(model(x.double()), y, reduction="none"))
    assert rec is not None and all(torch.isfinite(torch.tensor(v)) for v in rec.network.values() if v is not None)


# ---------------------------------------------------------------------------------------------------------------
# 8. everyday workflows: deepcopy with a tracker attached, a last batch of 1, gradient accumulation
def test_deepcopy_of_a_tracked_model_and_a_last_batch_of_one(tmp_path):
    from sdelip.tracking.tracker import SmallBatchWarning

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=tmp_path / "r.db")
    tracked_steps(tr, model, opt, 2)
    ema = copy.deepcopy(model)  # EMA weights / best-model snapshot
    assert ema is not model and all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))
    with torch.no_grad():
        ema(torch.randn(4, 6))
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.mul_(0.9).add_(p, alpha=0.1)
    tracked_steps(tr, model, opt, 2)
    # the last batch of an epoch holds one sample: not tracked, with a notice; the run goes on
    x, y = torch.randn(1, 6), torch.randint(0, 3, (1,))
    opt.zero_grad()
    with pytest.warns(SmallBatchWarning, match="step 4 has a mini-batch of M = 1"):
        assert tr.backward(F.cross_entropy(model(x), y, reduction="none")) is None
    opt.step()
    tracked_steps(tr, model, opt, 1)
    tr.close()
    assert load_record(tmp_path / "r.db")["step"].tolist() == [0, 1, 2, 3, 5]
    assert copy.deepcopy(model) is not None  # also after close


def test_gradient_accumulation_is_refused_with_the_way_out():
    from sdelip.tracking.tracker import GradientAccumulationError

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt.zero_grad()
    tr.backward(F.cross_entropy(model(x[:8]), y[:8], reduction="none"))
    with pytest.raises(GradientAccumulationError, match=r"step 1 without optimizer.step\(\).*one forward pass"):
        tr.backward(F.cross_entropy(model(x[8:]), y[8:], reduction="none"))
    opt.step()
    assert tr.step == 1
    opt.zero_grad()  # the way out: the whole update's samples in one forward pass and one call
    tr.backward(F.cross_entropy(model(x), y, reduction="none"))
    opt.step()
    assert tr.step == 2 and tr.last.batch_size == 16


# ---------------------------------------------------------------------------------------------------------------
# 9. threads: --threads, and a default that uses only the idle cores
def test_default_threads_use_the_idle_cores(monkeypatch):
    from sdelip.tracking.threads import default_threads, use_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert default_threads(load=0.1, cores=8) == 8  # quiet
    assert default_threads(load=2.2, cores=8) == 6
    assert default_threads(load=2.4, cores=2) == 1  # two busy processes on two cores
    assert default_threads(load=9.0, cores=4) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit choice wins
    assert default_threads(load=9.0, cores=4) == 3
    monkeypatch.undo()
    before = torch.get_num_threads()
    with use_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive integer"):
        with use_threads(0):
            pass


def test_a_skipped_optimizer_step_after_zero_grad_is_not_accumulation():
    """A GradScaler skips optimizer.step() on an overflow; the loop still zeroes the gradients: allowed."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt.zero_grad()
    tr.backward(F.cross_entropy(model(x[:8]), y[:8], reduction="none"))
    opt.zero_grad()  # the step was skipped, the gradients discarded
    rec = tr.backward(F.cross_entropy(model(x[8:]), y[8:], reduction="none"))
    opt.step()
    assert tr.step == 2 and rec is not None and rec.step == 1
