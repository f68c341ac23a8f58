"""The Tracker inside a training loop: semantics, optimizer handling, bad input, kill -9, resume, probes."""

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdelip._checks import DegenerateSpectrumWarning, NonFiniteError
from sdelip.rules.inventory import NoTrackableLayerError
from sdelip.tracking.probes import conv_operator_norm, lipschitz_lower_bound
from sdelip.record import StepRecord, load_metadata, load_probes, load_record, records_equal
from sdelip.tracking.schedule import EveryN, LogSchedule, StepList, as_schedule
from sdelip.core.spectral import weight_matrix
from sdelip.tracking.options import RecordOptions, RuntimeOptions, TrackingOptions
from sdelip.tracking.tracker import InputMismatchError, NotPlainSGDWarning, SmallBatchWarning, Tracker

DT = torch.float64
ROOT = Path(__file__).resolve().parents[2]


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def small_mlp(seed=0, dtype=DT):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def batch(k, M=8, dtype=DT):
    g = torch.Generator().manual_seed(1000 + k)
    return torch.randn(M, 6, generator=g, dtype=dtype), torch.randint(0, 3, (M,), generator=g)


def train(tracker, model, opt, steps, M=8, start=0):
    recs = []
    for k in range(start, start + steps):
        x, y = batch(k, M)
        opt.zero_grad()
        recs.append(tracker.backward(ce(model(x), y)))
        opt.step()
    return recs


# ----------------------------------------------------------------------------------------------
# semantics
def test_row_k_is_measured_before_update_k_and_t_is_k_eta(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=tmp_path / "r.db")
    sigmas = []
    for k in range(4):
        sigmas.append({n: float(torch.linalg.matrix_norm(weight_matrix(m.weight).detach(), 2))
                       for n, m in [("0", model[0]), ("2", model[2]), ("4", model[4])]})
        x, y = batch(k)
        opt.zero_grad()
        rec = tr.backward(ce(model(x), y))
        assert isinstance(rec, StepRecord) and rec.step == k
        opt.step()
    tr.close()
    df = load_record(tmp_path / "r.db")
    assert df["step"].tolist() == [0, 1, 2, 3]
    assert df["t"].tolist() == [0.0, 0.1, 0.1 * 2, 0.1 * 3]  # t_k = k·η exactly, no accumulated rounding
    for k in range(4):
        for n in ("0", "2", "4"):
            assert math.isclose(df[f"K/{n}"][k], sigmas[k][n], rel_tol=1e-12)
        assert math.isclose(df["Z"][k], sum(math.log(s) for s in sigmas[k].values()), rel_tol=1e-12)
        assert math.isclose(df["K"][k], math.exp(df["Z"][k]), rel_tol=1e-12)
    assert (df["drift_Z"] == df[["drift/0", "drift/2", "drift/4"]].sum(axis=1)).all()
    # tracking does not change training: same parameters as plain SGD
    ref = small_mlp()
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for k in range(4):
        x, y = batch(k)
        ropt.zero_grad()
        ce(ref(x), y).mean().backward()
        ropt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_schedules_select_the_right_steps(tmp_path):
    assert EveryN(3).steps(10) == [0, 3, 6, 9]
    assert EveryN(4, offset=2).steps(12) == [2, 6, 10]
    assert LogSchedule().steps(130) == list(range(10)) + [10, 12, 15, 19, 25, 31, 39, 50, 63, 79, 100, 125]
    assert LogSchedule(per_decade=2, dense=0).steps(120) == [0, 1, 3, 10, 31, 100]
    assert as_schedule(None)(17) and as_schedule(1)(5)
    assert isinstance(as_schedule("log"), LogSchedule)
    assert as_schedule([2, 5]).steps(7) == [2, 5] and isinstance(as_schedule([2, 5]), StepList)
    assert as_schedule(lambda k: k % 2 == 1).steps(5) == [1, 3]
    with pytest.raises(ValueError):
        as_schedule(0)
    with pytest.raises(ValueError):
        as_schedule("weekly")
    for spec, expected in ((3, [0, 3, 6, 9]), ("log", list(range(10)) + [10, 12]), ([1, 4], [1, 4])):
        model = small_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        tr = Tracker(model, opt, record=tmp_path / f"s{len(str(spec))}{expected[-1]}.db", schedule=spec)
        recs = train(tr, model, opt, 13 if spec == "log" else 10)
        tr.close()
        df = tr.to_dataframe()
        assert df["step"].tolist() == expected
        assert [r.step for r in recs if r is not None] == expected
        np.testing.assert_allclose(df["t"], np.array(expected) * 0.05, rtol=1e-13)


def test_weight_decay_shifts_drift_by_exactly_minus_lambda():
    x, y = batch(0)
    rows = {}
    for wd in (0.0, 0.03):
        model = small_mlp()
        tr = Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=wd))
        rows[wd] = tr.backward(ce(model(x), y)).as_row()
    for n in ("0", "2", "4"):
        assert math.isclose(rows[0.03][f"drift/{n}"] - rows[0.0][f"drift/{n}"], -0.03, rel_tol=0, abs_tol=1e-14)
        for q in ("K", "noise_curvature", "noise_curvature_var", "diffusion_sq", "gap"):
            assert rows[0.03][f"{q}/{n}"] == rows[0.0][f"{q}/{n}"]
    assert math.isclose(rows[0.03]["drift_Z"] - rows[0.0]["drift_Z"], -0.09, abs_tol=1e-13)


class _CustomSGD(torch.optim.SGD):
    """A subclass may change step(): it never inherits SGD's update rule."""


def test_optimizer_warnings():
    model = small_mlp()
    with pytest.warns(NotPlainSGDWarning, match="_CustomSGD has no update rule"):
        Tracker(model, _CustomSGD(model.parameters(), lr=0.1)).close()
    with warnings.catch_warnings():  # optimizers with a rule are modelled, not warned about
        warnings.simplefilter("error", NotPlainSGDWarning)
        for opt in (torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4),
                    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True),
                    torch.optim.Adam(model.parameters()), torch.optim.AdamW(model.parameters()),
                    torch.optim.RMSprop(model.parameters())):
            Tracker(model, opt).close()
    # the learning rate is read at every step (schedulers), and t accumulates it
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for k in range(4):
        x, y = batch(k)
        opt.zero_grad()
        tr.backward(ce(model(x), y))
        opt.step()
        sched.step()
    assert [r.lr for r in tr.history] == [0.1, 0.1, 0.05, 0.05]
    np.testing.assert_allclose([r.t for r in tr.history], [0.0, 0.1, 0.2, 0.25])
    # a tracked weight outside the optimizer is an error
    with pytest.raises(ValueError, match="not optimised"):
        Tracker(model, torch.optim.SGD(model[0].parameters(), lr=0.1))


def test_extra_noise_var_adds_isotropic_noise_terms():
    x, y = batch(0)
    model = small_mlp()
    tr = Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1))
    base = tr.backward(ce(model(x), y)).as_row()
    model = small_mlp()
    tr = Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1))
    tr.extra_noise_var = 0.02
    noisy = tr.backward(ce(model(x), y)).as_row()
    for n in ("0", "2", "4"):
        expect = 0.1 * 0.02 / base[f"K/{n}"] ** 2
        assert math.isclose(noisy[f"diffusion_sq/{n}"] - base[f"diffusion_sq/{n}"], expect, rel_tol=1e-9)
        assert noisy[f"noise_curvature/{n}"] > base[f"noise_curvature/{n}"]
        assert math.isclose(noisy[f"noise_curvature_cov/{n}"], base[f"noise_curvature_cov/{n}"], rel_tol=1e-9)


def test_metadata_and_context_manager(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Tracker(model, opt, record=RecordOptions(tmp_path / "m.db", metadata={"experiment": "unit", "seed": 7}),
                 schedule=2) as tr:
        train(tr, model, opt, 3)
    assert tr._closed
    meta = load_metadata(tmp_path / "m.db")
    assert meta["experiment"] == "unit" and meta["seed"] == 7
    assert meta["engine"] == "factored" and meta["batch_size"] == 8 and meta["lr"] == 0.1
    assert [l["name"] for l in meta["layers"]] == ["0", "2", "4"] and meta["layers"][0]["shape"] == [8, 6]
    assert meta["versions"]["torch"] == torch.__version__ and "sdelip" in meta["versions"]
    assert meta["schedule"] == "every 2 steps" and meta["dtype"] == "float64"
    assert "Sequential" in meta["model_summary"]
    # a record that holds steps is not silently overwritten
    from sdelip.record import RecordExistsError

    with pytest.raises(RecordExistsError):
        Tracker(model, opt, record=tmp_path / "m.db")
    Tracker(model, opt, record=RecordOptions(tmp_path / "m.db", mode="overwrite")).close()
    assert len(load_record(tmp_path / "m.db")) == 0


def test_start_step_continues_a_record(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=tmp_path / "s.db")
    train(tr, model, opt, 5)
    tr.close()
    tr = Tracker(model, opt, record=tmp_path / "s.db", start_step=3)
    assert tr.step == 3 and math.isclose(tr.t, 0.3)
    train(tr, model, opt, 2, start=3)
    tr.close()
    df = load_record(tmp_path / "s.db")
    assert df["step"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(df["t"], [0, 0.1, 0.2, 0.3, 0.4])


# ----------------------------------------------------------------------------------------------
# bad input
def test_scalar_loss_and_batch_size_one():
    model = small_mlp()
    tr = Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batch(0)
    with pytest.raises(ValueError, match=r"per-sample losses.*reduction='none'"):
        tr.backward(F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match=r"shape \(M,\)"):
        tr.backward(ce(model(x), y)[:, None].expand(8, 2))
    x1, y1 = batch(0, M=1)
    # a tracked step with M = 1 (the last batch of an epoch) is not tracked: a notice, and the plain backward
    with pytest.warns(SmallBatchWarning, match=r"M = 1 sample .*not tracked"):
        assert tr.backward(ce(model(x1), y1)) is None
    assert tr.step == 1 and tr.last is None
    # an untracked step with M = 1 is a plain step
    tr2 = Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1), schedule=[1])
    assert tr2.backward(ce(model(x1), y1)) is None and tr2.step == 1


class NaNGrad(torch.autograd.Function):
    """Identity forward; NaN backward when armed."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan") if NaNGrad.armed else g


class NaNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(NaNGrad.apply(torch.relu(self.fc1(x))))


def test_nan_loss_and_nan_gradient_name_step_and_layer(tmp_path):
    torch.manual_seed(0)
    model = NaNNet().to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=tmp_path / "n.db")
    train(tr, model, opt, 2)
    x, y = batch(2)
    losses = ce(model(x), y)
    bad = losses.clone()
    bad[3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 2.*samples \[3\]"):
        tr.backward(bad)
    NaNGrad.armed = True
    try:
        opt.zero_grad()
        with pytest.raises(NonFiniteError, match=r"layer 'fc1' at step 2"):
            tr.backward(ce(model(x), y))
    finally:
        NaNGrad.armed = False
    df = load_record(tmp_path / "n.db")  # intact up to the previous step
    assert df["step"].tolist() == [0, 1]
    assert np.isfinite(df.select_dtypes("number").to_numpy()).all()


def test_degenerate_top_singular_value_warns_and_is_flagged(tmp_path):
    model = small_mlp()
    with torch.no_grad():  # σ1 = σ2 = 2 exactly for the middle layer
        model[2].weight.copy_(torch.zeros(5, 8, dtype=DT))
        model[2].weight[0, 0] = 2.0
        model[2].weight[1, 1] = 2.0
        model[2].weight[2, 2] = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=tmp_path / "d.db")
    x, y = batch(0)
    with pytest.warns(DegenerateSpectrumWarning, match=r"layer '2' at step 0"):
        rec = tr.backward(ce(model(x), y))
    tr.close()
    df = load_record(tmp_path / "d.db")
    assert bool(df["degenerate/2"][0]) and bool(df["degenerate"][0]) and not bool(df["degenerate/0"][0])
    assert df["gap/2"][0] < 1e-12
    measured = df.select_dtypes("number").drop(columns=[c for c in df if c.startswith("realised") or c == "grad_scale"])
    assert np.isfinite(measured.to_numpy()).all()  # the update was not observed (closed before optimizer.step())
    assert df.filter(like="realised").isna().all().all() and df["update_modelled"].all()
    assert rec.degenerate
    # on_degenerate="raise" refuses the step
    from sdelip._checks import DegenerateSpectrumError

    tr = Tracker(model, opt, options=TrackingOptions(on_degenerate="raise"))
    with pytest.raises(DegenerateSpectrumError, match="layer '2'"):
        tr.backward(ce(model(x), y))


def test_device_and_dtype_mismatch_are_clear_errors():
    model = small_mlp(dtype=torch.float32)
    tr = Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batch(0)  # float64 data
    with pytest.raises(InputMismatchError, match=r"float32.*float64"):
        model(x)
    meta_model = nn.Sequential(nn.Linear(6, 3)).to("meta")
    Tracker(meta_model, torch.optim.SGD(meta_model.parameters(), lr=0.1))
    with pytest.raises(InputMismatchError, match=r"meta.*cpu"):
        meta_model(torch.zeros(2, 6))
    tr.close()


def test_no_trackable_layer_is_a_clear_error():
    model = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    with pytest.raises(NoTrackableLayerError, match="nothing to track"):
        Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_materialised_needs_loss_fn_and_batch():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="loss_fn"):
        Tracker(model, opt, engine="materialised")
    tr = Tracker(model, opt, engine="materialised", loss_fn=ce)
    x, y = batch(0)
    with pytest.raises(ValueError, match="batch="):
        tr.backward(ce(model(x), y))


# ----------------------------------------------------------------------------------------------
# probes
def test_conv_operator_norm_matches_dense_operator():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Conv2d(4, 2, 2, dilation=2, groups=2, padding=1,
                                                                    padding_mode="circular")):
        conv = conv.to(DT)
        shape = (conv.in_channels, 6, 7)
        d = math.prod(shape)
        with torch.no_grad():  # the dense operator, column j = conv(e_j)
            A = conv._conv_forward(torch.eye(d, dtype=DT).reshape(d, *shape), conv.weight, None).reshape(d, -1).mT
        exact = float(torch.linalg.svdvals(A)[0])
        res = conv_operator_norm(conv, shape, n_iter=500, tol=1e-10, generator=torch.Generator().manual_seed(0))
        assert res.norm <= exact * (1 + 1e-12) and math.isclose(res.norm, exact, rel_tol=1e-7), (res.norm, exact)
        # a warm start from the previous vector converges at once
        res2 = conv_operator_norm(conv, shape, init=res.vector, tol=1e-9)
        assert res2.iterations <= 3 and math.isclose(res2.norm, exact, rel_tol=1e-7)


def test_lipschitz_lower_bound():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).to(DT)
    x = torch.randn(4, 5, dtype=DT)
    sigma = float(torch.linalg.matrix_norm(lin.weight.detach(), 2))
    assert math.isclose(lipschitz_lower_bound(lin, x), sigma, rel_tol=1e-12)  # exact Jacobians
    wide = nn.Linear(5, 80).to(DT)  # more outputs than max_exact_outputs: power iteration
    sigma = float(torch.linalg.matrix_norm(wide.weight.detach(), 2))
    lb = lipschitz_lower_bound(wide, x, n_iter=300, tol=1e-13)
    assert lb <= sigma * (1 + 1e-12) and math.isclose(lb, sigma, rel_tol=1e-8)
    model = small_mlp()
    model.train()
    lb, per = lipschitz_lower_bound(model, torch.randn(10, 6, dtype=DT), per_sample=True)
    K = math.prod(float(torch.linalg.matrix_norm(model[i].weight.detach(), 2)) for i in (0, 2, 4))
    assert 0 < lb <= K and per.shape == (10,) and model.training
    for p in model.parameters():
        assert p.grad is None


def test_tracker_probes_are_recorded(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = torch.randn(3, 1, 5, 5, dtype=DT)
    tr = Tracker(model, opt, record=tmp_path / "p.db", options=TrackingOptions(probe_every=2), probe_input=probe,
                 schedule=[0, 1, 2, 3])
    for k in range(5):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(4, 1, 5, 5, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad()
        tr.backward(ce(model(x), y))
        opt.step()
    tr.close()
    df = load_record(tmp_path / "p.db")
    assert np.isfinite(df["conv_opnorm/0"][[0, 2]]).all() and np.isnan(df["conv_opnorm/0"][[1, 3]]).all()
    # the product of the exact conv norm and the Linear σ1 is a true upper bound (K itself, with the
    # reshaped kernel's σ1, need not be one for convolutions)
    upper = df["conv_opnorm/0"][[0, 2]] * df["K/3"][[0, 2]]
    assert (df["lipschitz_lower"][[0, 2]] <= upper * (1 + 1e-6)).all()
    probes = load_probes(tmp_path / "p.db")
    assert probes["step"].tolist() == [0, 2, 4]  # step 4 is probed though not tracked


# ----------------------------------------------------------------------------------------------
# durability: kill -9 and resume in new processes
TRAIN_SCRIPT = textwrap.dedent(
    """
    import random, sys
    import numpy as np
    import torch, torch.nn.functional as F
    from torch import nn
    from sdelip.tracking.options import RecordOptions
    from sdelip.tracking.tracker import Tracker

    mode, record, ckpt, n_total, n_half = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    torch.manual_seed(0); np.random.seed(0); random.seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(123)
    data = torch.Generator().manual_seed(7)
    X, Y = torch.randn(256, 10, generator=data, dtype=torch.float64), torch.randint(0, 3, (256,), generator=data)
    kw = dict(schedule=[k for k in range(n_total) if k % 4 != 3], probe_every=5,
              probe_input=X[:4])
    if mode == "resume":
        tracker = Tracker.resume(ckpt, model, opt, generators=[gen], **kw)
    else:
        tracker = Tracker(model, opt, record=RecordOptions(record, mode="overwrite"), **kw)
    while tracker.step < n_total:
        idx = torch.randint(0, 256, (16,), generator=gen)
        x = X[idx] + 0.01 * torch.from_numpy(np.random.randn(16, 10)) * random.random()
        opt.zero_grad()
        tracker.backward(F.cross_entropy(model(x), Y[idx], reduction="none"))
        opt.step()
        if mode == "first" and tracker.step == n_half:
            tracker.checkpoint(ckpt, generators=[gen])
        if mode == "first" and tracker.step == n_half + 3:
            break  # "crash" three steps after the checkpoint: those rows must be replaced on resume
        if mode == "slow":
            print(tracker.step, flush=True)
    torch.save(model.state_dict(), record + ".final.pt")
    tracker.close()
    """
)


def _run(script, *args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, check=True,
                          capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_resume_in_new_process_continues_the_record_exactly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    straight, split, ckpt = tmp_path / "straight.db", tmp_path / "split.db", tmp_path / "ckpt.pt"
    _run(script, "straight", straight, ckpt, 16, 8)
    _run(script, "first", split, ckpt, 16, 8)
    assert load_record(split)["step"].max() == 10  # rows past the checkpoint exist before resuming
    _run(script, "resume", split, ckpt, 16, 8)
    a, b = load_record(straight), load_record(split)
    assert a["step"].tolist() == [k for k in range(16) if k % 4 != 3]
    assert records_equal(a, b)  # bitwise
    sa = torch.load(str(straight) + ".final.pt")
    sb = torch.load(str(split) + ".final.pt")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert load_metadata(split)["resumed_at"] == [8]
    pa, pb = load_probes(straight), load_probes(split)
    assert pa["step"].tolist() == [0, 5, 10, 15] and pa.equals(pb)


def test_kill_9_leaves_every_completed_step_readable(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    rec = tmp_path / "killed.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), "slow", str(rec), str(tmp_path / "c.pt"), "100000", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = 0
        deadline = time.time() + 60
        while time.time() < deadline:  # read while it writes, until a few steps are committed
            line = proc.stdout.readline()
            if not line:
                break
            seen = int(line)
            if seen >= 12:
                break
        assert seen >= 12, proc.stderr.read()
        mid = load_record(rec)  # concurrent read during the run
        assert len(mid) >= 1
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    df = load_record(rec)
    tracked = [k for k in range(df["step"].max() + 1) if k % 4 != 3]
    assert df["step"].tolist() == tracked and len(df) >= len(mid)
    assert np.isfinite(df.drop(columns=["lipschitz_lower"]).select_dtypes("number").to_numpy()).all()


def test_in_memory_history_checkpoint_round_trip(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt)
    train(tr, model, opt, 3)
    tr.checkpoint(tmp_path / "c.pt")
    rows_a = [r.as_row() for r in train(tr, model, opt, 2, start=3)]
    model2 = small_mlp(seed=5)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    tr2 = Tracker(model2, opt2)
    tr2.restore(tmp_path / "c.pt")
    assert tr2.step == 3 and [r.step for r in tr2.history] == [0, 1, 2]
    rows_b = [r.as_row() for r in train(tr2, model2, opt2, 2, start=3)]
    assert rows_a == rows_b
    assert tr2.to_dataframe()["step"].tolist() == [0, 1, 2, 3, 4]


def test_resume_with_changed_tracker_options_is_refused_and_resumes_are_logged(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, opt, record=tmp_path / "r.db", schedule=2)
    train(tr, model, opt, 3)
    tr.checkpoint(tmp_path / "c.pt")
    tr.close()
    with pytest.raises(ValueError, match=r"schedule='every step' here, schedule='every 2 steps' in the checkpoint; "
                                         r"split=False here, split=True in the checkpoint"):
        other = small_mlp()
        Tracker.resume(tmp_path / "c.pt", other, torch.optim.SGD(other.parameters(), lr=0.1),
                       options=TrackingOptions(split=False))
    assert load_record(tmp_path / "r.db")["step"].tolist() == [0, 2]  # untouched
    model = small_mlp(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker.resume(tmp_path / "c.pt", model, opt, schedule=2)
    train(tr, model, opt, 2, start=3)
    tr.close()
    assert load_metadata(tmp_path / "r.db")["resumed_at"] == [3]
    # start_step continues the record and logs the resume after the earlier ones; the batch size stays the run's
    tr = Tracker(model, opt, record=tmp_path / "r.db", schedule=2, start_step=4)
    train(tr, model, opt, 1, start=4, M=5)
    tr.close()
    meta = load_metadata(tmp_path / "r.db")
    assert meta["resumed_at"] == [3, 4] and meta["batch_size"] == 8
