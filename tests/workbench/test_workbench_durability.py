"""The workbench under faults (issue 18): a damaged sweep task folder is rerun and named; train holds
its record until the final checkpoint is written."""

import sqlite3
import sys

from sdelip.record import RecordLockedError

from faults import ROOT


# ---------------------------------------------------------------------------------------------------------------
# 7. a damaged task folder of a sweep is run again, and named
def test_sweep_reruns_damaged_tasks_and_names_them(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    import sweep_tasks

    from sdelip.workbench.sweep import Task, run_sweep

    log, root = tmp_path / "calls.log", tmp_path / "sweep"
    tasks = [Task(name=f"x={x}", fn=sweep_tasks.with_record, config={"x": x, "log": str(log)}) for x in (1, 2, 3, 4)]
    first = run_sweep(tasks, root, workers=1, progress=False)
    assert first.ok
    d = {t.name: root / t.id for t in tasks}
    (d["x=1"] / "result.json").write_text("")  # empty
    text = (d["x=2"] / "result.json").read_text()
    (d["x=2"] / "result.json").write_text(text[: len(text) // 2])  # truncated
    db = (d["x=3"] / "record.db").read_bytes()
    (d["x=3"] / "record.db").write_bytes(db[: len(db) // 2])  # a truncated record of a complete task
    capsys.readouterr()
    again = run_sweep(tasks, root, workers=1, progress=False)
    err = capsys.readouterr().err
    assert again.ok and again.skipped == ("x=4",)
    assert [int(v) for v in log.read_text().split()] == [1, 2, 3, 4, 1, 2, 3]
    for name, what in (("x=1", "result.json is empty or truncated"), ("x=2", "result.json is empty or truncated"),
                       ("x=3", "record.db is damaged")):
        line = next(ln for ln in err.splitlines() if f"task {name!r}" in ln)
        assert what in line and "running it again" in line, line
    assert {k: r.value for k, r in again.results.items()} == {f"x={x}": {"y": x * x} for x in (1, 2, 3, 4)}
    assert len(sqlite3.connect(d["x=3"] / "record.db").execute("SELECT * FROM steps").fetchall()) == 200


def test_train_holds_the_record_until_its_final_checkpoint_is_written(tmp_path, monkeypatch):
    import importlib

    from sdelip.record.lock import RecordLock

    train_mod = importlib.import_module("sdelip.workbench.train")  # the module (sdelip.workbench.train is also the function)

    rec, seen = tmp_path / "r.db", []
    real = train_mod._save_checkpoint

    def save(path, config, *args):
        try:
            RecordLock(rec).release()
            seen.append("free")
        except RecordLockedError:
            seen.append("held")
        return real(path, config, *args)

    monkeypatch.setattr(train_mod, "_save_checkpoint", save)
    cfg = train_mod.TrainConfig(model="mlp", dataset="mnist-embedded", batch_size=8, steps=3, max_train_samples=64,
                                eval_test=False, record=str(rec), checkpoint=str(tmp_path / "c.pt"))
    train_mod.train(cfg, progress=False)
    assert seen and set(seen) == {"held"}  # the first, the periodic and the final checkpoint
    assert not (tmp_path / "r.db.lock").exists()
