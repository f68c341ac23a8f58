"""Benchmark: cost and memory per trajectory-step of the reshuffled parameter SDE against the iid ones.

One Euler step (``f_and_g_prod``, what torchsde's Euler step calls, on a fresh state) of
``ParameterSDE(model, data, lr)`` for the ensemble experiment's quick configuration (the
paper's MLP 784-512-256-10 on the 4,000 bundled digits, M = 64, η = 0.05) with

- ``iid-batch``: iid noise (M samples per trajectory), shared coupling, drift from an
  independent batch of B = 256 (the ensemble's iid SDE);
- ``iid-full``: iid noise, drift on the whole training set;
- ``reshuffle``: ``sampling="reshuffle"``: drift and the noise increment from one pass
  over all N = 4,000 samples per trajectory (one forward, a backward with two cotangents).

Each configuration runs in a fresh subprocess (one torch thread); its peak RSS (VmHWM,
reset after the setup) is reported with the median time per step over ``--repeats``.

Usage::

    python experiments/bench_reshuffle_sde.py                  # n = 16, 3 repeats
    python experiments/bench_reshuffle_sde.py --n 8 --repeats 2 --configs reshuffle
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "iid-batch": dict(sampling="iid", noise=dict(coupling="shared"), drift=dict(source="batch", batch_size=256)),
    "iid-full": dict(sampling="iid", noise=dict(coupling="shared"), drift=dict(source="full")),
    "reshuffle": dict(sampling="reshuffle"),
}


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    return float("nan")


def child(name: str, n: int, repeats: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from sdelip import models
    from sdelip.workbench.data import load_dataset
    from sdelip.sde import DriftOptions, NoiseOptions, ParameterSDE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = load_dataset("mnist-embedded")
    loader = torch.utils.data.DataLoader(getattr(train, "dataset", train), batch_size=64)
    model = models.MLP()
    cfg = dict(CONFIGS[name])
    options = {"noise": NoiseOptions(**cfg.pop("noise", {})), "drift": DriftOptions(**cfg.pop("drift", {}))}
    sde = ParameterSDE(model, loader, lr=0.05, **cfg, **options)
    y0 = sde.initial_state(n)
    gen = torch.Generator().manual_seed(0)
    _reset_peak()
    times = []
    for _ in range(repeats):
        y = y0 + 0.0  # a fresh state: nothing cached
        v = torch.randn(n, sde.brownian_size, generator=gen) * 0.05**0.5
        t0 = time.perf_counter()
        with torch.no_grad():
            sde.f_and_g_prod(0.0, y, v)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"config": name, "n": n, "N": len(sde.data), "M": sde.M, "brownian_size": sde.brownian_size,
            "seconds_per_step": step, "seconds_per_trajectory_step": step / n, "peak_rss_gib": _peak_rss(),
            "times": times}


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.repeats)))
        return []
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": str(ROOT)}
    for name in args.configs:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--n", str(args.n), "--repeats",
                              str(args.repeats)], capture_output=True, text=True, env=env, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:10s} n={row['n']} N={row['N']} M={row['M']}: {row['seconds_per_step']:.2f} s per step, "
              f"{row['seconds_per_trajectory_step']:.3f} s per trajectory-step, peak RSS {row['peak_rss_gib']:.2f} GiB",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
