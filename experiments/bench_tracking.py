"""Benchmark: the cost of leaving the Lipschitz tracker on (GitHub issue #3, item 7).

For the paper's MLP (784-512-256-10, M = 128, bundled MNIST digits) and ConvNet
(Table 1, 3×32×32 inputs, M = 256, the CIFAR-shaped stand-in built from the bundled
digits), in one process:

- the median wall time of a plain SGD step (zero_grad, forward, per-sample losses,
  ``losses.mean().backward()``, ``optimizer.step()``),
- the median time of the same step with full tracking every step (factored engine, all
  terms including the Prop 6 split, record written to SQLite),
- the same with the materialised engine (``torch.func.vmap`` per-sample gradients, the
  paper's approach) as the baseline.

Plain and tracked steps are interleaved (one of each in turn, on identical model copies,
on the same pre-loaded batches) so that background load affects them alike; data loading
is not timed. Peak memory is measured in a fresh subprocess per configuration as the
process's peak resident set size (``resource.getrusage(...).ru_maxrss``), both in total
and above the resident size after setup (model, data, first step done), because torch's
CPU allocations are invisible to tracemalloc.

Prints one line per model ending in ``tracked/plain = <ratio>`` (factored engine).

Usage::

    python experiments/bench_tracking.py                 # both models, timing + memory
    python experiments/bench_tracking.py --models mlp --steps 30 --no-memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sdelip.data import load_dataset  # noqa: E402
from sdelip.models import build_model  # noqa: E402
from sdelip.tracker import Tracker  # noqa: E402

CONFIGS = {
    "mlp": {"model": "mlp", "dataset": "mnist-embedded", "batch_size": 128, "lr": 0.01},
    "convnet": {"model": "convnet", "dataset": "cifar-standin", "batch_size": 256, "lr": 1e-3},
}


def batches(cfg: dict, n: int, seed: int = 0) -> list:
    info = load_dataset(cfg["dataset"])
    ds = info.dataset
    g = torch.Generator().manual_seed(seed)
    M = cfg["batch_size"]
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(ds), (M,), generator=g).tolist()
        items = [ds[i] for i in idx]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
        out.append((x.contiguous(), y))
    return out


def make(cfg: dict, seed: int = 0):
    info_shape = (1, 28, 28) if cfg["model"] == "mlp" else (3, 32, 32)
    model = build_model(cfg["model"], input_shape=info_shape, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    return model, opt


def plain_step(model, opt, x, y) -> None:
    opt.zero_grad()
    losses = F.cross_entropy(model(x), y, reduction="none")
    losses.mean().backward()
    opt.step()


def tracked_step(tracker, model, opt, x, y) -> None:
    opt.zero_grad()
    losses = F.cross_entropy(model(x), y, reduction="none")
    tracker.backward(losses, batch=(x, y))
    opt.step()


def make_tracker(model, opt, engine: str, record: str, decomposition: str) -> Tracker:
    import functools

    return Tracker(
        model, opt, record=record, overwrite=True, engine=engine, decomposition=decomposition,
        loss_fn=functools.partial(F.cross_entropy, reduction="none"), on_degenerate="ignore",
    )


def time_configs(name: str, steps: int, warmup: int, engines: list[str], decomposition: str) -> dict:
    cfg = CONFIGS[name]
    data = batches(cfg, 8)
    runs = {"plain": make(cfg)}
    trackers = {}
    tmp = tempfile.mkdtemp(prefix="bench_tracking_")
    for eng in engines:
        model, opt = make(cfg)
        runs[eng] = (model, opt)
        trackers[eng] = make_tracker(model, opt, eng, os.path.join(tmp, f"{name}_{eng}.db"), decomposition)
    times = {k: [] for k in runs}
    for k in range(warmup + steps):
        x, y = data[k % len(data)]
        for key, (model, opt) in runs.items():
            t0 = time.perf_counter()
            if key == "plain":
                plain_step(model, opt, x, y)
            else:
                tracked_step(trackers[key], model, opt, x, y)
            dt = time.perf_counter() - t0
            if k >= warmup:
                times[key].append(dt)
    for tr in trackers.values():
        tr.close()
    return {k: statistics.median(v) for k, v in times.items()}


def memory_child(name: str, engine: str, steps: int, decomposition: str) -> dict:
    cfg = CONFIGS[name]
    data = batches(cfg, 4)
    model, opt = make(cfg)
    tracker = None
    if engine != "plain":
        tmp = tempfile.mkdtemp(prefix="bench_tracking_mem_")
        tracker = make_tracker(model, opt, engine, os.path.join(tmp, "rec.db"), decomposition)
    # One step of plain SGD first so that the baseline includes the allocator's warm state
    # for the model itself (parameters, gradients) but not the tracker's first measurement.
    x, y = data[0]
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for k in range(steps):
        x, y = data[k % len(data)]
        if tracker is None:
            plain_step(model, opt, x, y)
        else:
            tracked_step(tracker, model, opt, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if tracker is not None:
        tracker.close()
    return {"setup_kib": rss_setup, "peak_kib": peak}


def measure_memory(name: str, engine: str, steps: int, decomposition: str) -> dict:
    cmd = [sys.executable, __file__, "--_memory-child", name, engine, str(steps), decomposition]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp", "convnet"], choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 40 MLP, 12 ConvNet)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the materialised engine")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--memory-steps", type=int, default=5)
    ap.add_argument("--decomposition", default="gram", choices=["svd", "gram"])
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--_memory-child", nargs=4, metavar=("MODEL", "ENGINE", "STEPS", "DECOMP"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory_child:
        name, engine, steps, decomp = args._memory_child
        print(json.dumps(memory_child(name, engine, int(steps), decomp)))
        return 0

    print(f"# machine: {machine()}")
    print(f"# decomposition={args.decomposition}; times are medians over interleaved steps; memory = peak RSS")
    results = {"machine": machine(), "decomposition": args.decomposition, "models": {}}
    for name in args.models:
        engines = ["factored"] + ([] if args.no_baseline else ["materialised"])
        steps = args.steps or (40 if name == "mlp" else 12)
        t = time_configs(name, steps, args.warmup, engines, args.decomposition)
        res = {"time_s": t, "steps": steps}
        parts = [f"{name} (M={CONFIGS[name]['batch_size']}): plain {t['plain'] * 1e3:.1f} ms",
                 f"factored {t['factored'] * 1e3:.1f} ms"]
        if "materialised" in t:
            parts.append(f"materialised {t['materialised'] * 1e3:.1f} ms "
                         f"(materialised/plain = {t['materialised'] / t['plain']:.1f})")
        if not args.no_memory:
            mem = {eng: measure_memory(name, eng, args.memory_steps, args.decomposition)
                   for eng in ["plain"] + engines}
            res["memory_kib"] = mem
            base = mem["plain"]
            for eng in engines:
                r = mem[eng]["peak_kib"] / base["peak_kib"]
                inc_p = max(1, base["peak_kib"] - base["setup_kib"])
                inc_e = mem[eng]["peak_kib"] - mem[eng]["setup_kib"]
                parts.append(f"peak RSS {eng}/plain = {r:.2f} ({mem[eng]['peak_kib'] / 1024:.0f} / "
                             f"{base['peak_kib'] / 1024:.0f} MiB; above setup {inc_e / 1024:.0f} / {inc_p / 1024:.0f} MiB)")
        parts.append(f"tracked/plain = {t['factored'] / t['plain']:.2f}")
        print(", ".join(parts), flush=True)
        results["models"][name] = res
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
