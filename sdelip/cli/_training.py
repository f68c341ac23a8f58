"""Commands that train: ``track`` and ``demo``, with their options."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

from ._output import _markdown_table, _print_table
from ._records import _degenerate, _load, _metadata, _simulate, prediction_summary, terms_summary


def _train_config(args, record: Optional[str]):
    from ..tracking.options import TrackingOptions
    from ..workbench.train import TrainConfig

    tracking = TrackingOptions(engine=args.engine, schedule=_schedule(args.track_every), split=not args.no_split,
                               decomposition=args.decomposition, probe_every=args.probe_every)
    return TrainConfig(
        model=args.model, dataset=args.dataset, data_root=args.data_root, download=args.download, lr=args.lr,
        batch_size=args.batch_size, steps=args.steps, init=args.init, init_std=args.init_std,
        init_seed=args.init_seed, sampling_seed=args.sampling_seed, regularizer=args.regularizer,
        track=True, tracking=tracking, record=record,
        checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
        max_train_samples=args.max_train_samples, device=args.device, dtype=args.dtype,
        overwrite=getattr(args, "overwrite", False), threads=args.threads,
    )


THREADS_HELP = ("torch CPU threads (default: the cores idle when the run starts, at least 1; OMP_NUM_THREADS wins "
                "when set)")


def _threads(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads must be at least 1, got {value}")
    return n


def _schedule(value: str):
    return value if value == "log" else int(value)


def _track_flags() -> dict:
    """TrainConfig option (flat spelling, :meth:`TrainConfig.to_flat`) → the ``sdelip track`` flag that sets it
    (from the parser itself)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--overwrite", action="store_true")
    _add_training_options(p)
    flags = {a.dest: max(a.option_strings, key=len) for a in p._actions if a.option_strings}
    flags["split"] = flags.pop("no_split")
    return flags


def cli_option(option: str, value) -> str:
    """A TrainConfig option (flat spelling) as the ``sdelip track`` command line spells it, e.g. ``--lr 0.01``."""
    from ..workbench.regularizers import PRESETS, RegularizerConfig

    flag = _track_flags().get(option)
    if flag is None:
        return f"{option}={value!r} (set from Python, no command-line flag)"
    if option == "split":
        return "without --no-split" if value else "--no-split"
    if option == "regularizer":  # a RegularizerConfig, or its str as the record metadata keeps it
        value = next((name for name, cfg in PRESETS.items() if cfg == value or str(cfg) == value),
                     ", ".join(value.active()) if isinstance(value, RegularizerConfig) else value)
    if isinstance(value, bool):
        return flag if value else f"without {flag}"
    if value is None:
        return f"without {flag}"
    return f"{flag} {value}"


def default_checkpoint(record) -> Path:
    """The checkpoint ``sdelip track`` keeps beside a record by default: ``<record>.ckpt``."""
    record = Path(record)
    return record.with_name(record.name + ".ckpt")


def cmd_track(args) -> int:
    from ..workbench.train import ResumeError, train

    record = Path(args.record)
    if args.no_checkpoint:
        args.checkpoint = None
    elif args.checkpoint is None:
        args.checkpoint = str(default_checkpoint(record))
    try:
        result = train(_train_config(args, str(record)), progress=not args.no_progress)
    except ResumeError as exc:
        raise ResumeError(exc.problem, exc.changes, exc.source, spell=cli_option) from None
    print(f"data: {result.data} ({result.data_source})")
    resumed = f" (resumed at step {result.resumed_at})" if result.resumed_at is not None else ""
    print(f"{result.steps} steps{resumed}, {result.seconds:.1f} s in this process; final loss {result.final_loss:.4f}, "
          f"train accuracy {result.train_accuracy:.3f} over all steps"
          + (f", test accuracy {result.test_accuracy:.3f}" if result.test_accuracy is not None else ""))
    print(f"K: {result.K_initial:.4g} -> {result.K_final:.4g}; record: {record}")
    if result.checkpoints:
        print(f"checkpoint: {args.checkpoint} ({result.checkpoints} written, {result.checkpoint_seconds:.2f} s)")
    return 0


def cmd_demo(args) -> int:
    from ..analysis.plotting import save_figure, summary_figure
    from ..analysis.prediction import predict
    from ..workbench.train import TrainConfig, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "record.db"
    if record_path.exists():
        record_path.unlink()
    t0 = time.perf_counter()
    print(f"[1/3] training the paper's MLP (784-512-256-10) with live tracking: {args.steps} SGD steps, "
          f"lr {args.lr}, batch {args.batch_size}")
    config = TrainConfig(model="mlp", dataset="mnist", data_root=args.data_root, lr=args.lr,
                         batch_size=args.batch_size, steps=args.steps, init_seed=args.seed,
                         sampling_seed=args.seed, record=str(record_path), track=True, threads=args.threads)
    result = train(config, progress=not args.no_progress)
    record = _load(record_path)
    pred = predict(record)
    print(f"[2/3] simulating {args.trajectories} trajectories of the reduced SDE (Thm 15) from the record")
    sim = _simulate(_degenerate(record, False, "the simulation"), None, args.trajectories, args.seed, "cpu",
                    not args.no_progress)
    print("[3/3] writing the figure and the tables")
    fig_path = save_figure(
        summary_figure(record, pred, simulation=sim,
                       title=f"MLP on {result.data}: {args.steps} steps, lr {args.lr}, M {args.batch_size}",
                       smooth=max(1, args.steps // 50), metadata=_metadata(record_path)),
        out / "demo.png")
    pred_rows = prediction_summary(record, pred)
    terms_rows = terms_summary(record)
    import numpy as np

    t_sim = np.asarray(sim["t"])
    last = len(t_sim) - 1
    lo, hi = min(sim["quantiles"]), max(sim["quantiles"])
    K_obs = float(record["K"].iloc[-1])
    summary = [
        "# sdelip demo",
        "",
        f"Data: {result.data_source}. Model: MLP 784-512-256-10, plain SGD (lr {args.lr}, M {args.batch_size}), "
        f"{args.steps} steps, every step tracked ({time.perf_counter() - t0:.0f} s in all).",
        f"Training loss {result.final_loss:.3f}, train accuracy {result.train_accuracy:.3f}"
        + (f", test accuracy {result.test_accuracy:.3f}." if result.test_accuracy is not None else "."),
        "",
        "## Observed K(t) against the Thm 16–17 prediction",
        "",
        _markdown_table(pred_rows),
        "K_mean + step drift adds the O(η) drift (η/2σ1)∇LᵀH∇L of a discrete SGD step, which the SDE drops "
        "(recorded per step as step_curvature; not part of the paper's Thm 14–17).",
        "",
        f"SDE Monte Carlo ({args.trajectories} trajectories): E[K(T)] = {float(sim['mean'][last]):.4g}, "
        f"{lo:.1%}–{hi:.1%} band [{float(sim['quantiles'][lo][last]):.4g}, {float(sim['quantiles'][hi][last]):.4g}]; "
        f"observed K(T) = {K_obs:.4g}.",
        "",
        "## Dynamics terms (time averages over the run)",
        "",
        _markdown_table(terms_rows),
        "![demo](demo.png)",
    ]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print()
    _print_table(pred_rows)
    print()
    _print_table(terms_rows)
    print(f"\nfigure: {fig_path}\ntables: {out / 'summary.md'}\nrecord: {record_path}")
    return 0


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="mlp", choices=["mlp", "convnet"], help="Table 2 MLP or Table 1 ConvNet")
    g.add_argument("--dataset", default="mnist",
                   choices=["mnist", "mnist-embedded", "cifar10", "cifar100", "cifar-standin"],
                   help="mnist falls back to the 5,000 bundled digits when no files are found")
    g.add_argument("--data-root", default=None, help="torchvision data folder (default $SDELIP_DATA or ./data)")
    g.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    g.add_argument("--max-train-samples", type=int, default=None, help="use only the first N training samples")
    g.add_argument("--init", default="default", choices=["default", "kaiming", "normal"], help="Sec 8.2 scheme")
    g.add_argument("--init-std", type=float, default=None, help="std for --init normal")
    s = p.add_argument_group("SGD")
    s.add_argument("--lr", type=float, default=0.01, help="learning rate η (the SDE time step)")
    s.add_argument("--batch-size", type=int, default=128, help="mini-batch size M (≥ 2)")
    s.add_argument("--steps", type=int, default=300, help="number of SGD steps")
    s.add_argument("--init-seed", type=int, default=0, help="parameter-initialisation seed")
    s.add_argument("--sampling-seed", type=int, default=0, help="mini-batch sampling seed (Sec 8.7)")
    s.add_argument("--regularizer", default="none",
                   choices=["none", "batchnorm", "dropout", "weight_decay", "mixup", "label_smoothing",
                            "autoaugment", "fgsm"], help="a Table 3 configuration")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    s.add_argument("--threads", type=_threads, default=None, help=THREADS_HELP)
    t = p.add_argument_group("tracking")
    t.add_argument("--track-every", default="1", help="track every N steps, or 'log' (logarithmic schedule)")
    t.add_argument("--engine", default="auto", choices=["auto", "factored", "materialised", "coupled"],
                   help="per-sample statistics engine")
    t.add_argument("--no-split", action="store_true", help="skip the Prop 6 variance/covariance split of κ")
    t.add_argument("--decomposition", default="fast", choices=["auto", "amortised", "fast", "svd", "gram"],
                   help="how σ1 and the Hessian terms are computed (fast: Gram resolvent; svd: thin SVD; amortised: the previous "
                        "step's eigenbasis refined, with a bound and fall-back; auto: amortised for min(m, n) >= 256)")
    t.add_argument("--probe-every", type=int, default=None,
                   help="every N steps also record exact conv norms and an empirical Lipschitz lower bound")
    t.add_argument("--checkpoint", default=None,
                   help="checkpoint file (default: RECORD.ckpt beside the record); an existing one is resumed, with "
                        "the same options as the run that wrote it, so rerunning a killed command continues it")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="write the checkpoint every N steps (default: automatically, as often as keeps the time "
                        "spent on checkpoints under 2.5%% of the run)")

