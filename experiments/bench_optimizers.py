"""Benchmark: the cost of tracking under Adam against the cost under SGD (docs/theory.md §15).

For each model of ``experiments/bench_tracking.py`` (the paper's MLP and ConvNet, the
4-layer transformer), four configurations run interleaved in one process on the same
pre-loaded batches: a plain SGD step, a tracked SGD step, a plain Adam step and a tracked
Adam step (factored engine, every term incl. the Prop 6 split, record written). Adam's
noise scale is elementwise, so its per-sample projections are those of S∘g_i (the
engines' ``scale=``); SGD's is a scalar. Prints, per model, the medians and

    tracked/plain (SGD),  tracked/plain (Adam),  and their ratio (Adam ÷ SGD).

Usage: ``python experiments/bench_optimizers.py [--models mlp convnet transformer] [--steps 20]``
(one thread; compare ratios from one run only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_tracking import CONFIGS, batches, make, plain_step, tracked_step  # noqa: E402

from sdelip.tracking.options import RecordOptions, TrackingOptions  # noqa: E402
from sdelip.tracking.tracker import Tracker  # noqa: E402

OPTIMIZERS = {"SGD": lambda p, lr: torch.optim.SGD(p, lr=lr), "Adam": lambda p, lr: torch.optim.Adam(p, lr=1e-3)}


def run(name: str, steps: int, warmup: int) -> dict:
    cfg = CONFIGS[name]
    data = batches(cfg, 8)
    tmp = tempfile.mkdtemp(prefix="bench_optimizers_")
    runs, trackers = {}, {}
    for opt_name, make_opt in OPTIMIZERS.items():
        for tracked in (False, True):
            model, _ = make(cfg)
            opt = make_opt(model.parameters(), cfg["lr"])
            key = (opt_name, tracked)
            runs[key] = (model, opt)
            if tracked:
                trackers[key] = Tracker(model, opt, record=RecordOptions(os.path.join(tmp, f"{name}_{opt_name}.db"),
                                                                         mode="overwrite"),
                                        options=TrackingOptions(engine="factored", on_degenerate="ignore"))
    times = {k: [] for k in runs}
    for k in range(warmup + steps):
        x, y = data[k % len(data)]
        for key, (model, opt) in runs.items():
            t0 = time.perf_counter()
            if key[1]:
                tracked_step(trackers[key], model, opt, x, y)
            else:
                plain_step(model, opt, x, y)
            if k >= warmup:
                times[key].append(time.perf_counter() - t0)
    for tr in trackers.values():
        tr.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    sgd = med[("SGD", True)] / med[("SGD", False)]
    adam = med[("Adam", True)] / med[("Adam", False)]
    return {"model": name, "plain SGD ms": 1e3 * med[("SGD", False)], "tracked SGD ms": 1e3 * med[("SGD", True)],
            "plain Adam ms": 1e3 * med[("Adam", False)], "tracked Adam ms": 1e3 * med[("Adam", True)],
            "tracked/plain SGD": sgd, "tracked/plain Adam": adam, "Adam ÷ SGD": adam / sgd}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "convnet", "transformer"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, one thread")
    for name in args.models:
        r = run(name, args.steps, args.warmup)
        print(f"{name}: plain/tracked SGD {r['plain SGD ms']:.1f}/{r['tracked SGD ms']:.1f} ms, "
              f"Adam {r['plain Adam ms']:.1f}/{r['tracked Adam ms']:.1f} ms; tracked/plain SGD "
              f"{r['tracked/plain SGD']:.2f}, Adam {r['tracked/plain Adam']:.2f}; Adam ÷ SGD {r['Adam ÷ SGD']:.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
