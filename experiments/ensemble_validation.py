"""Ensemble validation (beyond the paper): real SGD against the parameter SDE and the reduced SDE.

From one initialisation, three ensembles are set side by side at every step:

1. **real SGD**: N runs that differ only in their sampling seed, each tracked every step,
   in two sampling schemes: ``reshuffled`` (``sdelip.workbench.train``: a fresh permutation per
   epoch, mini-batches without replacement within it, as a DataLoader with shuffle=True
   does) and ``iid`` (every step draws M distinct samples independently of the other
   steps, the independent mini-batches that Def 4's SDE models). Within an epoch of
   reshuffled sampling the mini-batch noise at fixed θ sums to zero, which no SDE knows
   about; the iid control separates that from the rest of the model.
2. **the parameter SDE** (Def 4 / Def 10, ``sdelip.sde.LipschitzSDE(model, loader)``): n′
   Euler–Maruyama trajectories with dt = η of θ itself, drift −∇L(θ) and diffusion
   √η Σ(θ)^{1/2} estimated live from the model and the data at every trajectory's own θ.
   Its K is read three ways: Π σ1(θ(t)) of the simulated parameters (``direct``), the
   Itô-integrated log K of Thm 14 (``Itô``), and the same with the O(η) drift of a
   discrete step, (η/2σ1)∇Lᵀ H ∇L, added (``Itô + step curvature``: docs/theory.md §6; it
   removes the discrete-step bias from the comparison). The drift comes from an
   independent batch of B samples per trajectory and step, with the diffusion shrunk by
   √(1 − M/B) so that one step's covariance stays Def 4's (docs/sde.md).
3. **the reduced SDE** (Thm 14–17; ``sdelip.sde.ReducedLipschitzSDE``): per-layer
   Z^(ℓ) = log K^(ℓ) with the per-step *mean* over the N records of μ, κ and ‖λ‖² as
   fixed functions of time. Along a real run the tracker evaluates μ on that step's
   mini-batch, so one record carries its own run's gradient noise; the mean over the
   records estimates the expected-gradient drift of Thm 14, and κ and ‖λ‖², already
   expectations over the mini-batch, are only averaged. The initial state is the shared
   K^(ℓ)(0).

Tables (``--out``):

- ``summary.{csv,md}`` (the reduced SDE alone, for the full system and with one term
  removed at a time: κ, the diffusion λ dW, the Itô correction −½λ², the drift μ): the
  fraction of real runs inside the SDE's central 95 % band, the Var[K] ratio observed /
  SDE with a χ² 95 % interval, the mean bias in SDE standard deviations, and the per-run
  residual of Thm 16 with each run's own coefficients.
- ``three_way.{csv,md}``: at the reported steps, for each sampling scheme and each model
  (parameter SDE read three ways, reduced SDE): mean and Var of K and of log K, the Var
  ratios real / model with bootstrap 95 % intervals (resampling the real runs and, for the
  parameter SDE, its trajectories), and the coverage of the real runs by the model's
  central 95 % band (empirical quantiles of the model's trajectories).
- ``layers.{csv,md}``: the same for every layer's log K^(ℓ), real against the parameter
  SDE (Π σ1 of each simulated layer), with the layers' relative spectral gaps and the
  pathwise Euler error of the Itô-integrated log K^(ℓ).
- ``correlations.{csv,md}``: at the last step, every layer's spread of log K^(ℓ) and the
  correlations between layers, for the real ensembles and the SDE(s).

``--shared-noise`` adds ``N_SHARED_SDE`` trajectories of the parameter SDE with
``noise_coupling="shared"``: one Brownian motion drives every layer, so the noise has the
full covariance of the mini-batch gradient across layers (Assumption 3 dropped). Real
SGD moves all layers with one mini-batch; the comparison measures what Assumption 3
costs.

``--reshuffle`` adds the reshuffle leg (issue #19): ``N_RESHUFFLE_SDE`` trajectories of
``ParameterSDE(model, loader, sampling="reshuffle")`` (the dataset-level noise factor on the
epoch-pinned driver, drift on the whole training set; K read as Π σ1(θ)), and the
reduced system with epoch-pinned noise (``ReducedLipschitzSDE(..., steps_per_epoch=,
batch_fraction=)``) from the reshuffled runs' mean coefficients, against real reshuffled SGD:
``reshuffle.{csv,md}`` (the three-way table's columns, bootstrap intervals) and
``reshuffle.png`` (Var[K](t) of real reshuffled SGD, the iid SDE and the epoch SDE).
``--reshuffle-only`` runs just that leg: the reshuffled real runs, the reshuffled SDE and
``N_SHARED_SDE_RESHUFFLE_ONLY`` trajectories of the iid SDE with shared noise (the best iid
model, for the figure), and reduces only it; the task names and configs are those of the
full run, so a later full run reuses them.

Figures: ``ensemble_validation.png`` (the reduced SDE and its ablations) and
``three_way.png`` (K bands of the three, Var ratio against time, per-layer spread).

The runs are independent tasks (``tasks``) and the tables come from their records
(``reduce``), so the ensemble runs on a sweep engine (``--workers``, docs/sweeps.md).
Run ``python experiments/ensemble_validation.py --quick`` from the repository root.

This script holds the tasks (their functions stay here: a task's id hashes its
function's module and name, so moving them would rerun every cached task) and the entry
point; the rest is split by idea: ``ensemble_settings`` (scales, schemes, models),
``ensemble_results`` (the task results read back as ensembles), ``ensemble_stats``
(variance ratios and the tables' rows), ``ensemble_figures``, ``ensemble_reduce`` (the
iid and reshuffled comparison's tables) and ``ensemble_reshuffle`` (the reshuffle leg).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import pick, run_experiment, task_gpus  # noqa: E402
from ensemble_reduce import reduce  # noqa: E402,F401  (run_all reduces through it)
from ensemble_reshuffle import reduce_reshuffle  # noqa: E402
from ensemble_settings import (INIT_SEED, MODELS, N_RESHUFFLE_SDE, N_SHARED_SDE,  # noqa: E402,F401
                               N_SHARED_SDE_RESHUFFLE_ONLY, QUANTILES, RESHUFFLE_CHUNK, RESHUFFLE_MODELS, SAMPLING,
                               SCHEMES, SDE_PREFIX, SETTINGS, SHARED_MODEL, VARIANTS)
from ensemble_stats import bootstrap_var_ratio, var_ratio_interval  # noqa: E402,F401  (tests use them from here)


NAME = "ensemble_validation"

# -- tasks --------------------------------------------------------------------------------

def _config(s, args, seed, path, sampling="reshuffle"):
    """The :class:`sdelip.workbench.train.TrainConfig` of one run (every step tracked; ``path``: the record, or None)."""
    from sdelip.tracking import TrackingOptions
    from sdelip.workbench.train import TrainConfig

    return TrainConfig(model=s["model"], dataset=s["dataset"], data_root=args.data_root, download=args.download,
                       lr=s["lr"], batch_size=s["batch_size"], steps=s["steps"], init_seed=INIT_SEED,
                       sampling_seed=seed, sampling=sampling, track=True,
                       tracking=TrackingOptions(schedule=1, split=False, decomposition=s["decomposition"]),
                       record=None if path is None else str(path),
                       max_train_samples=s["max_train_samples"], device=args.device, eval_test=False)


def _args_of(config):
    """The data and device options of a task's config, as :func:`_config` reads them from the command line."""
    from types import SimpleNamespace

    return SimpleNamespace(data_root=config["data_root"], download=config["download"], device=config["device"])


def run_real(config: dict, workdir: Path) -> dict:
    """One real SGD run (task): the record of every step in ``workdir/record.db``.

    Returns:
        K after the last update (``K_final``), its per-layer log σ1, the data used and
        the number of training samples.
    """
    import torch

    from sdelip.rules.inventory import operator_norms, product_norm
    from sdelip.record import load_record
    from sdelip.workbench.train import prepare_data, train

    s, seed, scheme = config["settings"], config["seed"], config["scheme"]
    path = Path(workdir) / "record.db"
    cfg = _config(s, _args_of(config), seed, path, SAMPLING[scheme])
    res = train(cfg, progress=False)
    # K after the last update: train's own (σ1 in float32) for the reshuffled runs; for the iid control the
    # float64 product, which the committed tables used (they agree to about 1e-6 relative)
    kf = res.K_final if scheme == "reshuffled" else product_norm(res.model, torch.float64)
    data, source, model = res.data, res.data_source, res.model
    rec = load_record(path)
    T = s["steps"]
    if len(rec) != T or int(rec["step"].iloc[0]) != 0:
        raise RuntimeError(f"{scheme} run {seed}: expected {T} tracked rows from step 0, got {len(rec)}")
    log_norms = [math.log(v) for v in operator_norms(model, torch.float64)]  # float64, as the tables used
    return {"K_final": kf, "log_K_final_layers": log_norms, "data": data, "data_source": source,
            "n_train": len(prepare_data(cfg))}


def run_parameter_sde(config: dict, workdir: Path) -> dict:
    """One chunk of trajectories of the parameter SDE from the runs' initialisation (task).

    Euler–Maruyama with dt = η through ``torchsde.sdeint``, one segment of
    ``direct_every`` steps per call (the segment's states are summarised and dropped,
    so memory stays that of one segment, not of the whole path). Saves ``workdir/sde.npz`` with, at steps
    0..T, per trajectory and layer: the Itô-integrated log K^(ℓ) including the step
    curvature (``log_K_ito_sc``), the time integral of the step curvature
    (``int_step_curvature``; Itô without it = the difference), and log σ1 of the
    simulated weights (``log_K_direct``) with the relative gap (σ1 − σ2)/σ1 of every
    simulated weight matrix (``relative_gap``, Assumption 11), both NaN between the
    ``direct_every`` steps.
    """
    import time

    import torch
    import torchsde

    from sdelip.workbench.models import build_model
    from sdelip.sde import DriftOptions, GridBrownian, LipschitzSDE, LogKOptions, NoiseOptions, ParameterSDE
    from sdelip.workbench.train import prepare_data

    s, n, chunk = config["settings"], int(config["n"]), int(config["chunk"])
    T, lr, every = int(s["steps"]), float(s["lr"]), int(s["direct_every"])
    device = torch.device(config["device"])
    cfg = _config(s, _args_of(config), 0, None)
    info = prepare_data(cfg)
    model = build_model(s["model"], num_classes=info.num_classes, input_shape=info.input_shape,
                        seed=INIT_SEED).to(device)
    loader = torch.utils.data.DataLoader(info.dataset, batch_size=s["batch_size"])
    reshuffle = config["coupling"] == "reshuffle"
    if reshuffle:  # the epoch SDE: noise over all N samples on the epoch-pinned driver; K read as Π σ1(θ)
        sde = ParameterSDE(model, loader, lr=lr, sampling="reshuffle")
        y = sde.initial_state(n, device=device)
        bm = sde.brownian_motion(n, seed=chunk + 1, dtype=y.dtype, device=device)
    else:
        sde = LipschitzSDE(model, loader, lr=lr, drift=DriftOptions(source="batch", batch_size=s["grad_batch_size"]),
                           log_k=LogKOptions(include_step_curvature=True, integrate=("step_curvature",),
                                             on_degenerate="ignore"),
                           seed=10_007 * (chunk + 1), noise=NoiseOptions(coupling=config["coupling"]))
        y = sde.initial_state(n, device=device)
        bm = GridBrownian(0.0, lr, (n, sde.brownian_size), seed=chunk + 1, dtype=y.dtype, device=device)
    L = len(sde.layers)
    ito = np.full((T + 1, n, L), np.nan)
    isc = np.full((T + 1, n, L), np.nan)
    direct = np.full((T + 1, n, L), np.nan)
    gap = np.full((T + 1, n, L), np.nan)

    def save(k, y):
        with torch.no_grad():
            if not reshuffle:  # the reshuffled system has no log K rows: NaN
                ito[k] = sde.log_lipschitz(y, per_layer=True).double().cpu().numpy()
                isc[k] = sde.integrated(y, "step_curvature").double().cpu().numpy()
            if k % every == 0 or k == T:
                sv = [torch.linalg.svdvals(W)[..., :2] for W in sde.weight_matrices(y.double())]
                direct[k] = torch.stack([v[..., 0].log() for v in sv], -1).cpu().numpy()
                gap[k] = torch.stack([(v[..., 0] - v[..., 1]) / v[..., 0] for v in sv], -1).cpu().numpy()

    t0 = time.perf_counter()
    save(0, y)
    k = 0
    while k < T:
        k1 = min(k + every, T)
        ts = torch.arange(k, k1 + 1, dtype=torch.float64) * lr
        with torch.no_grad():
            ys = torchsde.sdeint(sde, y, ts, bm=bm, dt=lr, method="euler")
        for j in range(1, k1 - k + 1):
            save(k + j, ys[j])
        y = ys[-1]
        del ys
        k = k1
        if not np.isfinite(direct[k] if reshuffle else ito[k]).all():
            raise FloatingPointError(f"parameter SDE chunk {chunk}: log K is not finite at step {k}")
    np.savez_compressed(Path(workdir) / "sde.npz", log_K_ito_sc=ito, int_step_curvature=isc, log_K_direct=direct,
                        relative_gap=gap, layers=np.array(sde.layer_names))
    return {"n": n, "chunk": chunk, "seconds": time.perf_counter() - t0, "noise_scale": float(sde.noise_scale),
            "engine": sde.engine, "layers": list(sde.layer_names), "data": info.name, "data_source": info.source}


def tasks(args) -> list:
    """The independent runs: N real runs per sampling scheme and the parameter SDE's chunks."""
    from sdelip.workbench.sweep import Task

    s = pick(args.scale, **SETTINGS)
    base = {"scale": args.scale, "settings": s, "data_root": args.data_root, "download": bool(args.download),
            "device": args.device}
    gpus = task_gpus(args)
    only = getattr(args, "reshuffle_only", False)
    schemes = ("reshuffled",) if only else tuple(SCHEMES)
    out = [Task(name=f"{scheme}/seed={seed}", fn=run_real, config={**base, "scheme": scheme, "seed": seed}, gpus=gpus)
           for scheme in schemes for seed in range(1, s["n_runs"] + 1)]

    def sizes(n, chunk=s["sde_chunk"]):
        return [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])

    couplings = {} if only else {"layers": sizes(s["n_param_sde"])}
    if getattr(args, "shared_noise", False) and not only:
        couplings["shared"] = sizes(N_SHARED_SDE[args.scale])
    if only:  # the first chunks of the full run's shared-noise SDE (same names and configs)
        couplings["shared"] = sizes(N_SHARED_SDE[args.scale])[: max(1, N_SHARED_SDE_RESHUFFLE_ONLY[args.scale]
                                                                    // s["sde_chunk"])]
    if only or getattr(args, "reshuffle", False):
        couplings["reshuffle"] = sizes(N_RESHUFFLE_SDE[args.scale], RESHUFFLE_CHUNK[args.scale])
    out += [Task(name=f"{SDE_PREFIX[c]}/chunk={j}", fn=run_parameter_sde,
                 config={**base, "chunk": j, "n": n, "coupling": c}, gpus=gpus)
            for c, ns in couplings.items() for j, n in enumerate(ns)]
    return out


def add_arguments(p) -> None:
    """The script's own options."""
    p.add_argument("--shared-noise", action="store_true",
                   help="also simulate the parameter SDE with one Brownian motion for all layers "
                        "(noise_coupling='shared': SGD's full noise covariance, no Assumption 3); doubles the "
                        "SDE's cost")
    p.add_argument("--reshuffle", action="store_true",
                   help="add the reshuffle leg: the parameter SDE with sampling='reshuffle' (epoch-pinned noise) and "
                        "the epoch-pinned reduced SDE against real reshuffled SGD (reshuffle.md, reshuffle.png)")
    p.add_argument("--reshuffle-only", action="store_true",
                   help="run and reduce only the reshuffle leg (real reshuffled runs, the reshuffled SDE, a chunk of "
                        "the shared-noise iid SDE)")

def reduce_all(args, results: dict, out: Path) -> dict:
    """The legs that ran: the iid and reshuffled three-way comparison, and with ``--reshuffle`` the reshuffle leg."""
    if getattr(args, "reshuffle_only", False):
        return {"reshuffle": reduce_reshuffle(args, results, out)}
    res = reduce(args, results, out)
    if getattr(args, "reshuffle", False):
        res["reshuffle"] = reduce_reshuffle(args, results, out)
    return res


def main(argv=None) -> dict:
    """Run the experiment (tasks on the sweep engine, then reduce); returns the reduce dict."""
    return run_experiment(NAME, __doc__.splitlines()[0], tasks, reduce_all, argv, add_arguments=add_arguments)


if __name__ == "__main__":
    main()
