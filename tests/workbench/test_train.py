"""The training loop: determinism, exact resume, regularizers wired into the tracker."""

import json

import pytest
import torch

from sdelip.record import load_record
from sdelip.workbench.train import TrainConfig, batch_indices, train

BASE = dict(model="mlp", dataset="mnist-embedded", lr=0.05, batch_size=8, steps=6, max_train_samples=64,
            eval_test=False)


def run(tmp_path, name, **kw):
    cfg = TrainConfig(**{**BASE, "record": str(tmp_path / f"{name}.db"), **kw})
    return train(cfg, progress=False)


def test_batches_are_a_seeded_permutation_per_epoch():
    n, M = 20, 6  # 3 batches per epoch, 2 samples dropped
    epoch0 = torch.cat([batch_indices(k, n, M, seed=1) for k in range(3)])
    assert len(set(epoch0.tolist())) == 18
    assert torch.equal(batch_indices(4, n, M, seed=1), batch_indices(4, n, M, seed=1))
    assert not torch.equal(batch_indices(0, n, M, seed=1), batch_indices(0, n, M, seed=2))
    assert not torch.equal(batch_indices(0, n, M, seed=1), batch_indices(3, n, M, seed=1))  # new epoch
    # iid: each step its own M distinct samples, reproducible, not a partition of an epoch
    iid = [batch_indices(k, n, M, seed=1, sampling="iid") for k in range(3)]
    assert all(len(set(b.tolist())) == M for b in iid)
    assert torch.equal(iid[1], batch_indices(1, n, M, seed=1, sampling="iid"))
    assert len(set(torch.cat(iid).tolist())) < 18


def test_max_train_samples_keeps_every_class():
    from sdelip.workbench.train import prepare_data

    info = prepare_data(TrainConfig(dataset="mnist-embedded", max_train_samples=500))
    labels = torch.tensor([int(info.dataset[i][1]) for i in range(len(info))])
    assert len(info) == 500 and set(labels.tolist()) == set(range(10))


def test_seeds_make_runs_reproducible(tmp_path):
    a = run(tmp_path, "a", sampling_seed=3)
    b = run(tmp_path, "b", sampling_seed=3)
    c = run(tmp_path, "c", sampling_seed=4)
    assert a.K_final == b.K_final
    assert a.K_final != c.K_final
    assert a.K_initial == c.K_initial  # same init seed: same K(0) (Sec 8.7)
    ra, rb = load_record(a.record), load_record(b.record)
    assert ra["K"].equals(rb["K"]) and ra["noise_curvature_Z"].equals(rb["noise_curvature_Z"])


def test_resume_continues_exactly(tmp_path):
    straight = run(tmp_path, "straight", regularizer="mixup")
    ckpt = tmp_path / "ckpt.pt"
    rec = tmp_path / "resumed.db"
    first = TrainConfig(**{**BASE, "steps": 3, "record": str(rec), "checkpoint": str(ckpt), "regularizer": "mixup"})
    train(first, progress=False)
    second = TrainConfig(**{**BASE, "record": str(rec), "checkpoint": str(ckpt), "regularizer": "mixup"})
    resumed = train(second, progress=False)
    assert resumed.K_final == straight.K_final
    a, b = load_record(straight.record), load_record(rec)
    assert list(b["step"]) == list(range(6))
    for col in ("K", "loss", "drift_Z", "noise_curvature_Z", "diffusion_sq_Z"):
        assert torch.allclose(torch.tensor(a[col].to_numpy()), torch.tensor(b[col].to_numpy()), rtol=1e-12, atol=0)
    sa = straight.model.state_dict()
    sb = resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_noisy_gradient_variance_reaches_the_tracker(tmp_path):
    seen = []
    cfg = TrainConfig(**{**BASE, "steps": 2, "record": str(tmp_path / "n.db"),
                         "regularizer": {"noisy_gradient_rho": 0.5, "noisy_gradient_noise": "uniform"}})
    train(cfg, progress=False, callback=lambda step, loss, tracker: seen.append(tracker.extra_noise_var))
    assert seen == [pytest.approx(0.5 / 12)] * 2


def test_weight_decay_shifts_the_drift_by_lambda(tmp_path):
    plain = load_record(run(tmp_path, "p", steps=1).record)
    decayed = load_record(run(tmp_path, "d", steps=1, regularizer="weight_decay").record)
    # Row 0 is at the same parameters and mini-batch: only the drift changes, by exactly −λ per layer.
    # float32 model: the terms carry ~1e-7 relative rounding; the shift tested is 3e-3.
    assert decayed["drift_Z"][0] == pytest.approx(plain["drift_Z"][0] - 3 * 1e-3, abs=1e-6)
    assert decayed["noise_curvature_Z"][0] == pytest.approx(plain["noise_curvature_Z"][0], rel=1e-5)


def test_untracked_run_and_bad_config(tmp_path):
    res = train(TrainConfig(**{**BASE, "track": False}), progress=False)
    assert res.record is None or not (tmp_path / "none.db").exists()
    assert res.K_final > 0
    with pytest.raises(ValueError, match="at least 2 samples"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="preset"):
        TrainConfig(regularizer="nonsense")


# ----------------------------------------------------------------------------------------------
# resuming: the same configuration or nothing (issue 13)
def test_resume_refuses_changed_options_naming_each_with_both_values(tmp_path):
    from sdelip.record import load_metadata
    from sdelip.workbench.train import ResumeError

    ckpt, rec = tmp_path / "c.pt", tmp_path / "r.db"
    train(TrainConfig(**{**BASE, "steps": 3, "record": str(rec), "checkpoint": str(ckpt)}), progress=False)
    changed = TrainConfig(**{**BASE, "record": str(rec), "checkpoint": str(ckpt), "lr": 0.5, "batch_size": 4,
                             "regularizer": "mixup", "data_root": str(tmp_path), "checkpoint_every": 2})
    with pytest.raises(ResumeError) as info:
        train(changed, progress=False)
    err = info.value
    assert {(c.option, c.checkpoint, c.requested) for c in err.changes if c.option != "regularizer"} == {
        ("lr", 0.05, 0.5), ("batch_size", 8, 4)}
    assert [c.option for c in err.changes] == ["lr", "batch_size", "regularizer"]  # not the free options
    assert "lr=0.5 now, lr=0.05 in the checkpoint" in str(err) and "overwrite=True" in str(err)
    df = load_record(rec)  # nothing was written
    assert list(df["step"]) == [0, 1, 2] and (df["batch_size"] == 8).all()
    assert "resumed_at" not in load_metadata(rec)
    # more steps and the free options are a continuation
    res = train(TrainConfig(**{**BASE, "record": str(rec), "checkpoint": str(ckpt), "data_root": str(tmp_path)}),
                progress=False)
    assert res.resumed_at == 3 and list(load_record(rec)["step"]) == list(range(6))


def test_crash_and_resume_gives_the_uninterrupted_run_and_its_summary(tmp_path):
    from sdelip.record import load_metadata, records_equal

    straight = run(tmp_path, "straight")
    ckpt, rec = tmp_path / "c.pt", tmp_path / "r.db"
    cfg = TrainConfig(**{**BASE, "record": str(rec), "checkpoint": str(ckpt), "checkpoint_every": 2})

    def crash(step, loss, tracker):
        if step == 4:  # after the checkpoint at step 4 and the record row of step 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, callback=crash)
    assert list(load_record(rec)["step"]) == [0, 1, 2, 3, 4]
    resumed = train(cfg, progress=False)
    assert resumed.resumed_at == 4 and load_metadata(rec)["resumed_at"] == [4]
    assert records_equal(straight.record, rec)
    assert (resumed.final_loss, resumed.train_accuracy) == (straight.final_loss, straight.train_accuracy)
    # killed after the last checkpoint: the rerun does no step and still reports the whole run
    again = train(cfg, progress=False)
    assert again.resumed_at == 6 and load_metadata(rec)["resumed_at"] == [4, 6]
    assert (again.final_loss, again.train_accuracy) == (straight.final_loss, straight.train_accuracy)
    assert records_equal(straight.record, rec)


def test_resume_refuses_mismatched_files_and_overwrite_starts_anew(tmp_path):
    from sdelip.workbench.train import ResumeError

    ckpt, rec = tmp_path / "c.pt", tmp_path / "r.db"
    first = TrainConfig(**{**BASE, "steps": 2, "record": str(rec), "checkpoint": str(ckpt)})
    train(first, progress=False)
    # the record of another run with this checkpoint
    other = tmp_path / "other.db"
    train(TrainConfig(**{**BASE, "steps": 2, "record": str(other), "sampling_seed": 9}), progress=False)
    with pytest.raises(ResumeError, match=r"(?s)record .*other.db.*sampling_seed=0 now, sampling_seed=9 in the record"):
        train(TrainConfig(**{**BASE, "record": str(other), "checkpoint": str(ckpt)}), progress=False)
    # a record without its checkpoint, a checkpoint without its record, fewer steps than done
    with pytest.raises(ResumeError, match=r"already exists and there is no checkpoint .*missing.pt"):
        train(TrainConfig(**{**BASE, "record": str(rec), "checkpoint": str(tmp_path / "missing.pt")}), progress=False)
    with pytest.raises(ResumeError, match=r"record .*gone.db.* does not exist"):
        train(TrainConfig(**{**BASE, "record": str(tmp_path / "gone.db"), "checkpoint": str(ckpt)}), progress=False)
    with pytest.raises(ResumeError, match="asks for 1 steps, fewer than the checkpoint"):
        train(TrainConfig(**{**BASE, "steps": 1, "record": str(rec), "checkpoint": str(ckpt)}), progress=False)
    # a checkpoint of an earlier version (no options) cannot be checked
    state = torch.load(ckpt, weights_only=False)
    old = tmp_path / "old.pt"
    torch.save({k: state[k] for k in ("model", "optimizer", "step", "K_initial")}, old)
    with pytest.raises(ResumeError, match="not an sdelip training checkpoint .*format None"):
        train(TrainConfig(**{**BASE, "record": str(rec), "checkpoint": str(old)}), progress=False)
    # overwrite: a new run with other options, from step 0
    res = train(TrainConfig(**{**BASE, "lr": 0.1, "record": str(rec), "checkpoint": str(ckpt), "overwrite": True}),
                progress=False)
    df = load_record(rec)
    assert res.resumed_at is None and list(df["step"]) == list(range(6)) and (df["lr"] == 0.1).all()
    assert json.loads(torch.load(ckpt, weights_only=True)["options"])["lr"] == 0.1


def test_iid_stream_is_one_generator_and_a_resumed_run_replays_it(tmp_path):
    from sdelip.workbench.train import iid_stream_seed

    n, M = 20, 6
    gen = torch.Generator().manual_seed(iid_stream_seed(1))
    expected = [torch.randperm(n, generator=gen)[:M] for _ in range(5)]
    for k in (3, 0, 4, 1):  # any order: a late step replays the draws before it
        assert torch.equal(batch_indices(k, n, M, seed=1, sampling="iid"), expected[k])
    straight = run(tmp_path, "straight", sampling="iid")
    ckpt, rec = tmp_path / "ckpt.pt", tmp_path / "resumed.db"
    train(TrainConfig(**{**BASE, "steps": 3, "record": str(rec), "checkpoint": str(ckpt), "sampling": "iid"}),
          progress=False)
    resumed = train(TrainConfig(**{**BASE, "record": str(rec), "checkpoint": str(ckpt), "sampling": "iid"}),
                    progress=False)
    assert resumed.resumed_at == 3 and resumed.K_final == straight.K_final
    assert load_record(rec)["K"].equals(load_record(straight.record)["K"])
