"""Tests of sdelip.workbench.sweep: record folders, failures, resume after a kill, files returned, Ray.

The task functions live in tests/sweep_tasks.py (a sweep runs top-level functions of
importable modules). Everything runs in-process except the last test, which runs a tiny
experiment on a local Ray instance with 2 workers through experiments/run_all and
compares its summary with the in-process run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sweep_tasks
from sdelip.workbench.sweep import FAILURES_FILE, RESULT_FILE, Progress, Task, fn_reference, run_sweep

TESTS = Path(__file__).resolve().parents[1]  # tests/, where sweep_tasks.py lives
REPO = TESTS.parent
EXPERIMENTS = REPO / "experiments"


def _tasks(log: Path, xs=(1, 2, 3), extra=None) -> list[Task]:
    """Tasks square(x) logging to ``log``; ``extra``: x → more config (e.g. ``{"fail": True}``)."""
    extra = extra or {}
    return [Task(name=f"x={x}", fn=sweep_tasks.square, config={"x": x, "log": str(log), **extra.get(x, {})})
            for x in xs]


def _calls(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def test_in_process_results_record_folders_and_skip(tmp_path):
    log, root = tmp_path / "calls.log", tmp_path / "records"
    tasks = _tasks(log)
    out = run_sweep(tasks, root, workers=1, progress=False)
    assert out.ok and list(out.results) == ["x=1", "x=2", "x=3"] and out.skipped == ()
    for t in tasks:
        r = out.results[t.name]
        assert r.value == {"y": t.config["x"] ** 2} and r.task == t and r.seconds >= 0
        assert r.dir == root / t.id
        assert (r.dir / "out.txt").read_text() == f"x={t.config['x']}"
        assert json.loads((r.dir / "sub" / "x.json").read_text()) == {"x": t.config["x"]}
        meta = json.loads((r.dir / RESULT_FILE).read_text())
        assert meta["name"] == t.name and meta["config"] == t.config and meta["value"] == r.value
    assert not list((root / ".staging").iterdir())  # every staging folder was renamed into place
    assert _calls(log) == [1, 2, 3]
    again = run_sweep(tasks, root, workers=1, progress=False)  # complete folders are skipped
    assert again.skipped == ("x=1", "x=2", "x=3") and _calls(log) == [1, 2, 3]
    assert {k: v.value for k, v in again.results.items()} == {k: v.value for k, v in out.results.items()}
    run_sweep(tasks[:1], root, workers=1, progress=False, fresh=True)  # fresh: run again
    assert _calls(log) == [1, 2, 3, 1]


def test_task_id_is_stable_and_depends_on_fn_name_and_config(tmp_path):
    t = Task(name="a", fn=sweep_tasks.square, config={"x": 1, "log": "l"})
    assert t.id == Task(name="a", fn=sweep_tasks.square, config={"log": "l", "x": 1}).id  # key order irrelevant
    assert len({t.id, Task("b", sweep_tasks.square, {"x": 1, "log": "l"}).id,
                Task("a", sweep_tasks.square, {"x": 2, "log": "l"}).id}) == 3
    assert fn_reference(sweep_tasks.square) == "sweep_tasks:square"
    # the id is the same in another process (a resumed sweep finds its folders)
    code = "import sweep_tasks; from sdelip.workbench.sweep import Task; print(Task('a', sweep_tasks.square, {'x': 1, 'log': 'l'}).id)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TESTS,
                          env=_env(), check=True)
    assert proc.stdout.strip() == t.id


def test_a_script_loaded_under_another_name_is_referenced_by_its_file():
    """A test loads an experiment from its path as '_experiment_x' without registering it in sys.modules:
    its task functions are still named by the file's stem, which a worker can import."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_loaded_elsewhere", TESTS / "sweep_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "_loaded_elsewhere" not in sys.modules
    assert fn_reference(module.square) == "sweep_tasks:square"


def test_bad_tasks_are_refused_with_their_name():
    with pytest.raises(ValueError, match="top-level function"):
        Task(name="l", fn=lambda c, w: {}, config={})
    with pytest.raises(ValueError, match="task 'bad': config is not JSON-able"):
        Task(name="bad", fn=sweep_tasks.square, config={"x": object()})
    t = Task(name="same", fn=sweep_tasks.square, config={"x": 1, "log": "l"})
    with pytest.raises(ValueError, match="unique.*same"):
        run_sweep([t, Task(name="same", fn=sweep_tasks.square, config={"x": 2, "log": "l"})], "/nonexistent",
                  workers=1)
    with pytest.raises(ValueError, match="workers"):
        run_sweep([t], "/nonexistent", workers=0)


def test_failure_is_reported_with_its_config_and_the_others_finish(tmp_path):
    log, root = tmp_path / "calls.log", tmp_path / "records"
    tasks = _tasks(log, xs=(1, 2, 3), extra={2: {"fail": True}})
    out = run_sweep(tasks, root, workers=1, progress=False)
    assert not out.ok and set(out.results) == {"x=1", "x=3"} and list(out.failures) == ["x=2"]
    f = out.failures["x=2"]
    assert f.error == "ValueError: boom at x=2" and "Traceback" in f.traceback and "boom" in f.traceback
    assert "'x=2'" in f.describe() and '"fail":true' in f.describe()  # names the task and its config
    assert not (root / tasks[1].id).exists()  # no record folder for a failed task
    entries = json.loads((root / FAILURES_FILE).read_text())
    assert [(e["name"], e["config"], e["error"]) for e in entries] == [("x=2", tasks[1].config, f.error)]
    assert not list((root / ".staging").iterdir())
    fixed = _tasks(log, xs=(1, 3))  # a sweep without failures there removes the file
    run_sweep(fixed, root, workers=1, progress=False)
    assert not (root / FAILURES_FILE).exists()


def test_run_experiment_reduces_nothing_and_exits_non_zero_after_a_failure(tmp_path, monkeypatch):
    sys.path.insert(0, str(EXPERIMENTS))
    import common

    log = tmp_path / "calls.log"
    reduced = []
    with pytest.raises(SystemExit) as exc:
        common.run_experiment("demo", "demo", lambda args: _tasks(log, extra={1: {"fail": True}}),
                              lambda args, results, out: reduced.append(results),
                              ["--tiny", "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    msg = str(exc.value.code)
    assert "1 of 3 runs failed" in msg and "boom at x=1" in msg and '"x":1' in msg and "nothing reduced" in msg
    assert reduced == [] and _calls(log) == [1, 2, 3]  # the other runs finished


def _env() -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


KILLED_SWEEP = """
import sys, sweep_tasks
from pathlib import Path
from sdelip.workbench.sweep import Task, run_sweep
log, root, flag = sys.argv[1:4]
tasks = [Task(name=f"x={x}", fn=sweep_tasks.square, config={"x": x, "log": log, "kill_flag": flag})
         for x in (1, 2, 3, 4)]
run_sweep(tasks, root, workers=1, progress=False)
"""


def test_resume_after_a_killed_sweep_reruns_only_the_missing_tasks(tmp_path):
    log, root, flag = tmp_path / "calls.log", tmp_path / "records", tmp_path / "kill-at-3"
    script = tmp_path / "sweep.py"
    script.write_text(KILLED_SWEEP.replace('"kill_flag": flag', '"kill_flag": flag if x == 3 else None'))
    flag.touch()
    proc = subprocess.run([sys.executable, str(script), str(log), str(root), str(flag)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # killed (SIGKILL) in the middle of task x=3
    assert _calls(log) == [1, 2, 3]
    complete = sorted(p.name for p in root.iterdir() if (p / RESULT_FILE).exists())
    assert len(complete) == 2
    assert len(list((root / ".staging").iterdir())) == 1  # the killed task's half-written folder
    flag.unlink()
    proc = subprocess.run([sys.executable, str(script), str(log), str(root), str(flag)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _calls(log) == [1, 2, 3, 3, 4]  # only the missing tasks ran again
    assert "2 of 4 tasks already complete" in proc.stderr
    assert sum((p / RESULT_FILE).exists() for p in root.iterdir()) == 4
    assert not list((root / ".staging").iterdir())  # the stale staging folder was cleared


def test_files_come_back_to_the_driver_when_the_root_is_not_shared(tmp_path):
    log = tmp_path / "calls.log"
    shared = run_sweep(_tasks(log), tmp_path / "a", workers=1, progress=False)
    returned = run_sweep(_tasks(log), tmp_path / "b", workers=1, progress=False, shared=False)
    for name, r in returned.results.items():
        s = shared.results[name]
        assert r.value == s.value and r.dir.parent == tmp_path / "b"
        files = sorted(p.relative_to(r.dir).as_posix() for p in r.dir.rglob("*") if p.is_file())
        assert files == ["out.txt", RESULT_FILE, "sub/x.json"]
        assert (r.dir / "sub" / "x.json").read_bytes() == (s.dir / "sub" / "x.json").read_bytes()


def test_progress_lines_count_done_running_failed_with_eta():
    stream = io.StringIO()
    p = Progress(total=3, workers=2, bar=False, label="demo", stream=stream)
    p.submitted(3)
    p.finished("a", True, 1.0)
    p.finished("b", False, 0.5, "ValueError: x")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[demo] 1/3 a: ok in 1.0 s; done 1, running 2, failed 0, ETA ")
    assert lines[1].startswith("[demo] 2/3 b: FAILED (ValueError: x) in 0.5 s; done 1, running 1, failed 1, ETA ")
    assert p.eta_seconds() is not None and p.eta_seconds() >= 0


def test_the_library_and_an_in_process_sweep_do_not_import_ray(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"  # any `import ray` raises ImportError
            "import sdelip, sdelip.workbench.sweep, sweep_tasks\n"
            "from sdelip.workbench.sweep import Task, run_sweep\n"
            f"out = run_sweep([Task('a', sweep_tasks.square, {{'x': 2, 'log': {str(tmp_path / 'l')!r}}})], "
            f"{str(tmp_path / 'r')!r}, workers=1, progress=False)\n"
            "assert out.results['a'].value == {'y': 4}\n"
            # Ray is imported only when a task is to run on it: here it fails, naming the extra
            f"run_sweep([Task('b', sweep_tasks.square, {{'x': 3, 'log': {str(tmp_path / 'l')!r}}})], "
            f"{str(tmp_path / 'r')!r}, workers=2)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs Ray: pip install 'sdelip[sweep]'" in proc.stderr


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_ray_with_two_workers_gives_the_in_process_results(tmp_path):
    pytest.importorskip("ray")
    sys.path.insert(0, str(EXPERIMENTS))
    import fig4_sampling

    fig4_sampling.main(["--tiny", "--out", str(tmp_path / "inproc"), "--workers", "1", "--no-progress"])
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "run_all"), "--scale", "tiny", "--only", "fig4_sampling",
         "--out-root", str(tmp_path / "ray"), "--workers", "2"],
        capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on Ray, workers 2" in proc.stdout and "fig4_sampling            ok" in proc.stdout
    ray_out, local = tmp_path / "ray" / "fig4_sampling", tmp_path / "inproc"
    assert _rows(ray_out / "summary.csv") == _rows(local / "summary.csv")
    assert json.loads((ray_out / "summary.json").read_text())["rows"] == \
        json.loads((local / "summary.json").read_text())["rows"]
    # the same record folders (ids) as the script alone, each complete
    assert sorted(p.name for p in (ray_out / "records").iterdir() if (p / RESULT_FILE).exists()) == \
        sorted(p.name for p in (local / "records").iterdir() if (p / RESULT_FILE).exists())
    # run by Ray workers (not the driver), at this process's priority (Ray's own default is nice 15)
    metas = [json.loads((p / RESULT_FILE).read_text()) for p in (ray_out / "records").iterdir()
             if (p / RESULT_FILE).exists()]
    assert all(m["nice"] == os.nice(0) for m in metas)
    assert metas and os.getpid() not in {m["pid"] for m in metas}  # the in-process runs have this pid
