"""Benchmark: one Euler step of the live LipschitzSDE against its gradient evaluations (issue #10).

The live system ``LipschitzSDE(model, data, lr=...)`` spends an Euler step on, per
trajectory, the expected gradient ∇L(θ) (the drift; here the whole training set) and the
noise mini-batch of M samples (the increment G·dB and the per-sample projections of the
log K rows), plus the decomposition of every weight matrix (σ1, u1, v1 and the Hessian
quadratic forms of κ). Its **floor** is the same gradient evaluations done by plain
autograd, one trajectory after the other, in the same process:

    for each trajectory: full-set loss → backward;  weighted mini-batch loss Σ_i w_i ℓ_i → backward

``live/floor`` is the median time of ``f_and_g_prod`` (what torchsde's Euler step calls,
on a fresh state so that nothing is cached) over the median floor time, the two measured
alternately (so that background load affects both alike). The parameter SDE alone
(``ParameterSDE``, no log K rows) is timed too. Peak memory is measured in a fresh
subprocess per configuration as the kernel's peak RSS (VmHWM) during the steps, reset
after the setup (as in ``bench_tracking.py``), with glibc's mmap threshold fixed.

Configurations: the paper's MLP (784-512-256-10, M = 128, η = 0.01) on the 4,000
embedded MNIST training digits with n = 16 and n = 64 trajectories, and the Table 1
ConvNet (M = 256, η = 1e-3) on the CIFAR-shaped stand-in built from the digits with
n = 8. ``--materialised N`` also times the per-sample (materialised) engine with N
trajectories, for the old figures.

Usage::

    python experiments/bench_live_sde.py                       # all, 1 thread, timing + memory
    python experiments/bench_live_sde.py --configs mlp16 --repeats 2 --no-memory
    python experiments/bench_live_sde.py --device cuda --configs mlp256 mlp1024 convnet64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "experiments")):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_tracking import _reset_peak_rss, _status_kib, machine  # noqa: E402

from sdelip.workbench.data import load_dataset  # noqa: E402
from sdelip.workbench.models import build_model  # noqa: E402
from sdelip.sde import LipschitzSDE, LogKOptions, ParameterSDE  # noqa: E402

#: name -> (model, dataset, M, η, trajectories)
CONFIGS = {
    "mlp16": ("mlp", "mnist-embedded", 128, 0.01, 16),
    "mlp64": ("mlp", "mnist-embedded", 128, 0.01, 64),
    "convnet8": ("convnet", "cifar-standin", 256, 1e-3, 8),
    "mlp256": ("mlp", "mnist-embedded", 128, 0.01, 256),
    "mlp1024": ("mlp", "mnist-embedded", 128, 0.01, 1024),
    "convnet64": ("convnet", "cifar-standin", 256, 1e-3, 64),
}
DEFAULT = ("mlp16", "mlp64", "convnet8")


#: LipschitzSDE's decomposition option for every configuration (``--decomposition``).
DECOMPOSITION = ["auto"]


def setup(name: str, device: str, n: int | None = None, engine: str = "factored", cls=LipschitzSDE):
    """The model, its training set (X, Y) on the device, and the SDE; n overrides the trajectories."""
    model_name, dataset, M, lr, n_default = CONFIGS[name]
    ds = load_dataset(dataset).dataset
    X = torch.stack([ds[i][0] for i in range(len(ds))]).to(device)
    Y = torch.tensor([int(ds[i][1]) for i in range(len(ds))], device=device)
    shape = tuple(X.shape[1:])
    model = build_model(model_name, input_shape=shape, seed=0).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {"log_k": LogKOptions(decomposition=DECOMPOSITION[0], on_degenerate="ignore")} if cls is LipschitzSDE else {}
        sde = cls(model, (X, Y), lr=lr, noise_batch_size=M, engine=engine, seed=0, **extra)
    return model, (X, Y), sde, (n or n_default)


def floor_step(model, data, M: int, states: torch.Tensor, sde, gen: torch.Generator, data_chunk: int = 4096) -> None:
    """The gradient evaluations of one Euler step by plain autograd, trajectory by trajectory."""
    X, Y = data
    params = [p for p in model.parameters() if p.requires_grad]
    for theta in states:
        torch.nn.utils.vector_to_parameters(theta, params)  # the layout order is named_parameters order
        for p in params:
            p.grad = None
        N = len(X)
        for s in range(0, N, data_chunk):
            xb, yb = X[s : s + data_chunk], Y[s : s + data_chunk]
            (F.cross_entropy(model(xb), yb) * (len(xb) / N)).backward()
        idx = torch.randint(0, N, (M,), generator=gen).to(X.device)
        w = torch.randn(M, generator=gen).to(X.device)
        grads = torch.autograd.grad((F.cross_entropy(model(X[idx]), Y[idx], reduction="none") * (w - w.mean())).sum(),
                                    params)
        del grads


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_config(name: str, device: str, repeats: int) -> dict:
    """Median seconds of the floor, the LipschitzSDE step and the ParameterSDE step (alternating)."""
    model, data, sde, n = setup(name, device)
    psde = ParameterSDE(model, data, lr=sde.lr, noise_batch_size=sde.M, seed=0)
    y0 = sde.initial_state(n, device=device)
    gen = torch.Generator().manual_seed(0)
    y0[:, : sde.n_params] += 1e-3 * torch.randn(n, sde.n_params, generator=gen).to(y0)  # distinct trajectories
    v = torch.randn(n, sde.brownian_size, generator=gen).to(y0) * sde.lr**0.5
    floor_model = build_model(CONFIGS[name][0], input_shape=tuple(data[0].shape[1:]), seed=0).to(device)
    times = {"floor": [], "lipschitz": [], "parameter": []}

    def timed(key, fn):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times[key].append(time.perf_counter() - t0)

    # one warm-up of each (allocator, first calls, chunk sizes), then interleaved repeats
    sde.f_and_g_prod(0.0, y0.clone(), v)
    psde.f_and_g_prod(0.0, y0[:, : sde.n_params].clone(), v)
    floor_step(floor_model, data, sde.M, y0[:, : sde.n_params], sde, gen)
    for r in range(repeats):
        timed("floor", lambda: floor_step(floor_model, data, sde.M, y0[:, : sde.n_params], sde, gen))
        timed("lipschitz", lambda: sde.f_and_g_prod(float(r + 1), y0.clone(), v))
        timed("parameter", lambda: psde.f_and_g_prod(float(r + 1), y0[:, : sde.n_params].clone(), v))
    out = {k: statistics.median(t) for k, t in times.items()}
    out["breakdown"] = breakdown(sde, y0, device)
    out.update(n=n, M=sde.M, P=sde.n_params, N=len(data[0]), chunks=list(sde.chunk_sizes(y0)), raw=times)
    return out


def breakdown(sde, y0, device) -> dict:
    """Seconds of the parts of one LipschitzSDE evaluation (f at a fresh state), timed inside that one call:
    the expected gradient and the batches (``sde.draw``), the decompositions (``sde.extra_rows.decompose``, the
    log K rows), and the rest (noise pass, projections, terms)."""
    spent = {"drift_and_batch": 0.0, "decompositions": 0.0}

    def timed(key, fn):
        def wrapper(*a, **kw):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync(device)
            spent[key] += time.perf_counter() - t0
            return out
        return wrapper

    rows = sde.extra_rows
    sde.draw = timed("drift_and_batch", sde.draw)  # instance attributes shadow the methods for this one call
    rows.decompose = timed("decompositions", rows.decompose)
    try:
        sync(device)
        t0 = time.perf_counter()
        sde.f(-1.0, y0.clone())
        sync(device)
        total = time.perf_counter() - t0
    finally:
        del sde.draw, rows.decompose
    Ws = sde.weight_matrices(y0[:, : sde.n_params])
    return {"total": total, **spent, "noise_pass_and_terms": total - sum(spent.values()),
            "routes": [rows.route(W.shape[1:], y0.device) for W in Ws]}


def time_materialised(name: str, device: str, n: int) -> dict:
    """One step of the materialised (per-sample) engine with n trajectories (old figures)."""
    model, data, sde, n = setup(name, device, n=n, engine="materialised")
    y0 = sde.initial_state(n, device=device)
    v = torch.randn(n, sde.brownian_size).to(y0)
    sync(device)
    t0 = time.perf_counter()
    sde.f_and_g_prod(0.0, y0, v)
    sync(device)
    return {"n": n, "seconds": time.perf_counter() - t0}


def memory_child(name: str, device: str, engine: str, n: int) -> dict:
    """Peak RSS (CPU) or peak allocated memory (CUDA) of two Euler steps in a fresh process."""
    import gc

    model, data, sde, n = setup(name, device, n=n or None, engine=engine)
    y0 = sde.initial_state(n, device=device)
    v = torch.randn(n, sde.brownian_size).to(y0)
    gc.collect()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        setup_b = torch.cuda.memory_allocated()
    reset = _reset_peak_rss()
    setup_kib = _status_kib("VmRSS") if reset else 0
    for k in range(2):
        sde.f_and_g_prod(float(k), y0.clone(), v)
    out = {"setup_kib": setup_kib, "peak_kib": _status_kib("VmHWM") if reset else 0, "reset": reset, "n": n}
    if cuda:
        out.update(cuda_setup_mib=setup_b / 2**20, cuda_peak_mib=torch.cuda.max_memory_allocated() / 2**20)
    return out


def measure_memory(name: str, device: str, engine: str = "factored", n: int = 0) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--_memory-child", name, device, engine, str(n), DECOMPOSITION[0]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT), choices=list(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps of each kind (median)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--materialised", type=int, default=0, metavar="N",
                   help="also time one step of the materialised engine with N trajectories")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this file")
    p.add_argument("--decomposition", default="auto", choices=["auto", "fast", "svd"],
                   help="LipschitzSDE's decomposition route (auto: Gram route for large layers on CPU)")
    p.add_argument("--_memory-child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    DECOMPOSITION[0] = args.decomposition
    if args._memory_child:
        name, device, engine, n, DECOMPOSITION[0] = args._memory_child
        print(json.dumps(memory_child(name, device, engine, int(n))))
        return {}
    print(f"machine: {machine()}; device {args.device}")
    if torch.device(args.device).type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    results = {}
    for name in args.configs:
        r = time_config(name, args.device, args.repeats)
        ratio = r["lipschitz"] / r["floor"]
        line = (f"{name}: n = {r['n']}, M = {r['M']}, P = {r['P']:,}, N = {r['N']}: floor {r['floor']:.3f} s, "
                f"LipschitzSDE {r['lipschitz']:.3f} s, ParameterSDE {r['parameter']:.3f} s per Euler step "
                f"(chunks {r['chunks']}); parameter/floor = {r['parameter'] / r['floor']:.2f}; "
                f"live/floor = {ratio:.2f}")
        b = r["breakdown"]
        line += (f"\n  one evaluation: drift + batches {b['drift_and_batch']:.3f} s, decompositions "
                 f"{b['decompositions']:.3f} s ({'/'.join(b['routes'])}), noise pass + terms "
                 f"{b['noise_pass_and_terms']:.3f} s")
        if not args.no_memory:
            mem = measure_memory(name, args.device)
            r["memory"] = mem
            line += f"; peak RSS {mem['peak_kib'] / 2**20:.2f} GiB (setup {mem['setup_kib'] / 2**20:.2f} GiB)"
            if "cuda_peak_mib" in mem:
                line += f", CUDA peak {mem['cuda_peak_mib'] / 1024:.2f} GiB"
        if args.materialised:
            m = time_materialised(name, args.device, args.materialised)
            r["materialised"] = m
            line += f"; materialised engine, n = {m['n']}: {m['seconds']:.2f} s"
            if not args.no_memory:
                mm = measure_memory(name, args.device, "materialised", args.materialised)
                r["materialised"]["memory"] = mm
                line += f", peak RSS {mm['peak_kib'] / 2**20:.2f} GiB"
        print(line, flush=True)
        results[name] = r
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
