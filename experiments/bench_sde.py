"""Benchmark: torchsde.sdeint on the reduced Z-system against a hand-written Euler loop.

10⁴ trajectories of the reduced system (Thm 14–16, per-layer Z^(ℓ), diagonal noise) of
the paper's ConvNet (Table 1: conv1, conv2, conv3, fc1, fc2) over 39,000 steps of
η = 1e-3 (the length of the paper's runs), coefficients from a synthetic tracking record
with the columns of ``sdelip.record.load_record``. Both integrators use the same
coefficient tensors, the same Brownian increments (two GridBrownian objects with the
same seed, so both pay for drawing them) and save the same 391 times; the script checks
that their results agree and prints ``sdeint/hand-written = <ratio>``.

Run: ``python experiments/bench_sde.py`` (add ``--trajectories``, ``--steps``,
``--threads`` to vary; ``--quick`` for a 1/10 run).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchsde

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdelip.sde import GridBrownian, ReducedLipschitzSDE, simulate  # noqa: E402

LAYERS = ("features.conv1", "features.conv2", "features.conv3", "classifier.fc1", "classifier.fc2")


def synthetic_record(steps: int, lr: float, seed: int = 0) -> pd.DataFrame:
    """A record-shaped DataFrame: per-layer K, μ, κ, ‖λ‖² per step (magnitudes like a ConvNet run)."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps) * lr
    cols = {"step": np.arange(steps), "t": t, "lr": np.full(steps, lr), "loss": 2.3 * np.exp(-t / 10)}
    for i, name in enumerate(LAYERS):
        decay = np.exp(-t / (5 + 3 * i))
        cols[f"K/{name}"] = np.full(steps, 1.0 + 0.5 * i)
        cols[f"drift/{name}"] = 0.05 * decay + 0.01 * rng.standard_normal(steps)
        cols[f"noise_curvature/{name}"] = 0.002 * (1 + decay) * rng.uniform(0.5, 1.5, steps)
        cols[f"diffusion_sq/{name}"] = 1e-4 * (1 + decay) * rng.uniform(0.5, 1.5, steps)
    df = pd.DataFrame(cols)
    df.attrs["lr"] = lr
    return df


def hand_written_euler(sde: ReducedLipschitzSDE, y0: torch.Tensor, n_steps: int, every: int, bm: GridBrownian):
    """Euler–Maruyama in a plain Python loop on the system's own coefficient tensors."""
    a = sde.log_drift.to(y0.dtype).unbind(0)
    b = sde.diffusion.to(y0.dtype).unbind(0)
    dt = sde.dt
    y = y0
    out = [y0]
    for k in range(n_steps):
        y = y + a[k] * dt + b[k] * bm.increment(k)
        if (k + 1) % every == 0 or k + 1 == n_steps:
            out.append(y)
    return torch.stack(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trajectories", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=39_000)
    p.add_argument("--every", type=int, default=100, help="save every this many steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="time each integrator this many times (interleaved), keep the best")
    p.add_argument("--quick", action="store_true", help="3,900 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 3_900
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    n, T, every = args.trajectories, args.steps, args.every

    record = synthetic_record(T, args.lr)
    sde = ReducedLipschitzSDE.from_record(record).to(dev)
    ts = sde.time_grid(every=every)
    y0 = sde.initial_state(n, device=dev)
    size = (n, sde.brownian_size)
    print(f"reduced system: {sde.n_layers} layers, {T} steps of dt = {sde.dt}, {n} trajectories, "
          f"{len(ts)} saved times, float32, {args.threads} thread(s), device {dev}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, torchsde {torchsde.__version__}")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def time_once(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    def run_sdeint():
        bm = GridBrownian(sde.t0, sde.dt, size, seed=0, device=dev)
        with torch.no_grad():
            return torchsde.sdeint(sde, y0, ts, bm=bm, dt=sde.dt, method="euler")

    def run_hand():
        bm = GridBrownian(sde.t0, sde.dt, size, seed=0, device=dev)
        with torch.no_grad():
            return hand_written_euler(sde, y0, T, every, bm)

    # Warm up both paths (allocator, first calls) on a short horizon.
    with torch.no_grad():
        torchsde.sdeint(sde, y0, ts[:3], bm=GridBrownian(sde.t0, sde.dt, size, seed=1, device=dev), dt=sde.dt,
                        method="euler")
        hand_written_euler(sde, y0, 2 * every, every, GridBrownian(sde.t0, sde.dt, size, seed=1, device=dev))
    # Interleaved repeats, best of each: a shared machine's load affects both alike.
    t_hand = t_sdeint = math.inf
    for _ in range(args.repeats):
        dt_hand, ys_hand = time_once(run_hand)
        dt_sdeint, ys = time_once(run_sdeint)
        t_hand, t_sdeint = min(t_hand, dt_hand), min(t_sdeint, dt_sdeint)
        print(f"  repeat: hand-written {dt_hand:.2f} s, sdeint {dt_sdeint:.2f} s")
    # What drawing the increments alone costs (both integrators pay it).
    bm = GridBrownian(sde.t0, sde.dt, size, seed=0, device=dev)
    def draw_all():
        for k in range(T):
            bm.increment(k)

    t_rng, _ = time_once(draw_all)
    diff = float((ys - ys_hand).abs().max())
    ratio = t_sdeint / t_hand
    # The front end on the same problem (statistics and quantiles included).
    t_front = time.perf_counter()
    res = simulate(sde, n, ts, dt=sde.dt, device=dev, seed=0, progress=False)
    t_front = time.perf_counter() - t_front
    K_end = float(res.mean_K[-1])
    th = float(res.theory.mean_K[-1])
    se = math.sqrt(float(res.var_K[-1]) / n)
    print(f"hand-written Euler loop: {t_hand:.2f} s ({t_hand / T * 1e6:.0f} µs/step)")
    print(f"torchsde.sdeint:         {t_sdeint:.2f} s ({t_sdeint / T * 1e6:.0f} µs/step)")
    print(f"  of which Brownian increments: {t_rng:.2f} s ({t_rng / T * 1e6:.0f} µs/step)")
    print(f"simulate() front end:    {t_front:.2f} s (chunk {res.chunk_size}, moments + quantiles)")
    print(f"max |sdeint − hand-written| over all saved states: {diff:.3g}")
    print(f"E[K(T)]: Monte Carlo {K_end:.5g} ± {se:.2g}, Thm 17 {th:.5g}")
    print(f"sdeint/hand-written = {ratio:.3f}")
    return {"t_hand": t_hand, "t_sdeint": t_sdeint, "t_front": t_front, "t_rng": t_rng, "ratio": ratio,
            "max_diff": diff}


if __name__ == "__main__":
    main()
