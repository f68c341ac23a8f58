"""Figures from tracking records, predictions and simulations.

Every function takes the tidy objects the rest of sdelip produces (the DataFrame of
:func:`sdelip.record.load_record`, the DataFrame of :func:`sdelip.analysis.prediction.predict`,
a simulation result) and draws on a matplotlib Axes, creating a figure when none is
given. Nothing here computes a dynamics term: plots show recorded numbers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..core.catalogue import LOG_K_COEFFICIENTS, layer_column, term as term_spec

__all__ = [
    "layer_names",
    "layer_label",
    "run_title",
    "TIME_LABEL",
    "plot_prediction",
    "plot_terms",
    "plot_noise_split",
    "plot_simulation",
    "summary_figure",
    "save_figure",
]


def _plt():
    import os

    import matplotlib

    if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")  # headless: write files, never open windows
    import matplotlib.pyplot as plt

    return plt


def _axes(ax, figsize=(6, 4)):
    if ax is not None:
        return ax.figure, ax
    plt = _plt()
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


#: The x-label of every time axis (the SDE's clock: the learning rates summed, docs/theory.md §1).
TIME_LABEL = "t = Σ η_k (SDE time)"


def layer_names(record) -> list[str]:
    """Layer names present in a record DataFrame, in column order (forward order)."""
    return [c.split("/", 1)[1] for c in record.columns if c.startswith("K/")]


def _layer_kind(metadata, name: str) -> Optional[str]:
    """"Linear 784→512" from a record's metadata ``layers`` entry (kind and weight shape), else None."""
    for entry in (metadata or {}).get("layers") or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            kind, shape = entry.get("kind"), list(entry.get("shape") or ())
            if not kind:
                return None
            if len(shape) == 2 and kind == "Linear":
                return f"{kind} {shape[1]}→{shape[0]}"
            return f"{kind} {'×'.join(map(str, shape))}" if shape else str(kind)
    return None


def layer_label(record, name: str, metadata: Optional[dict] = None) -> str:
    """A layer's legend label: its module path, with its type and shape when the record's metadata is given
    (``"fc1 (Linear 784→512)"``, ``nn.Sequential``'s ``"0 (Linear 784→512)"``), and for a tied weight applied
    c > 1 times "(used c×)"."""
    col = f"uses/{name}"
    c = int(record[col].iloc[0]) if col in record and len(record) else 1
    kind = _layer_kind(metadata, name)
    label = name if kind is None else f"{name} ({kind})"
    return label if c == 1 else f"{label} (used {c}×)"


def run_title(metadata: Optional[dict], record=None) -> str:
    """What the run was, in one line, from a record's metadata: model, optimizer and learning rate (its range
    under a schedule), batch size, steps, data."""
    meta = dict(metadata or {})
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    parts = []
    model = config.get("model") or meta.get("model") or "model"
    layers = meta.get("layers") or []
    parts.append(f"{model} ({len(layers)} tracked layers)" if layers else str(model))
    opt = meta.get("optimizer")
    opt = opt.get("class") if isinstance(opt, dict) else opt
    lr = None
    if record is not None and "lr" in getattr(record, "columns", ()) and len(record):
        lrs = record["lr"].to_numpy(dtype=float)
        lr = f"lr {lrs[0]:g}" if np.allclose(lrs, lrs[0], rtol=1e-9) else f"lr {lrs[0]:g}→{lrs[-1]:g} (schedule)"
    elif meta.get("lr") is not None:
        lr = f"lr {meta['lr']:g}"
    parts.append(" ".join(str(x) for x in (opt or "SGD", lr) if x))
    M = meta.get("batch_size") or config.get("batch_size")
    if M:
        parts.append(f"batch {M}")
    if record is not None and "step" in getattr(record, "columns", ()) and len(record):
        steps = record["step"].to_numpy()
        parts.append(f"steps {int(steps[0])}–{int(steps[-1])} ({len(steps)} tracked)")
    data = meta.get("data") or config.get("dataset")
    if data:
        parts.append(f"data {data}")
    return ", ".join(parts)


def plot_prediction(pred, ax=None, title: Optional[str] = None, band_sd: float = 2.0, logy: bool = False):
    """Observed K(t) against the Thm 17 mean ± ``band_sd`` sd and the Thm 16 drift path.

    Args:
        pred: DataFrame from :func:`sdelip.analysis.prediction.predict` (columns t, K_observed,
            K_mean, K_std and optionally K_path).
        ax: matplotlib Axes to draw on.
        title: axes title.
        band_sd: half-width of the band in standard deviations.
        logy: log-scaled y axis.
    """
    fig, ax = _axes(ax)
    t = pred["t"].to_numpy()
    mean, sd = pred["K_mean"].to_numpy(), pred["K_std"].to_numpy()
    ax.fill_between(t, mean - band_sd * sd, mean + band_sd * sd, color="C0", alpha=0.2,
                    label=f"Thm 17: E[K] ± {band_sd:g} sd")
    ax.plot(t, mean, color="C0", lw=2.2, label="Thm 17: E[K(t)]", zorder=3)
    if "K_mean_discrete" in pred and np.isfinite(pred["K_mean_discrete"].to_numpy()).all():
        ax.plot(t, pred["K_mean_discrete"].to_numpy(), color="C1", lw=1.2, ls="-.",
                label="E[K] + discrete-step drift (not in the paper)")
    if "K_path" in pred:
        ax.plot(t, pred["K_path"].to_numpy(), color="C2", lw=1, ls="--", label="Thm 16: exp(drift path)")
    ax.plot(t, pred["K_observed"].to_numpy(), color="k", lw=1, label="observed K(t) = Π σ1")
    ax.set_xlabel(TIME_LABEL)
    ax.set_ylabel("K(t) = Π_ℓ σ1(W_ℓ)")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return fig, ax


def plot_terms(record, terms: Sequence[str] = LOG_K_COEFFICIENTS, axes=None,
               layers: Optional[Sequence[str]] = None, smooth: int = 1, title: Optional[str] = None,
               metadata: Optional[dict] = None):
    """Per-layer and network dynamics terms of Thm 14–15 over time, one panel per term.

    Args:
        record: DataFrame from :func:`sdelip.record.load_record`.
        terms: which terms to draw (names or record columns of :data:`sdelip.core.catalogue.TERMS`).
        axes: a sequence of Axes, one per term.
        layers: subset of layer names (default all).
        smooth: moving-average window in rows (1 = raw).
        title: figure title.
        metadata: the record's metadata (:func:`sdelip.record.load_metadata`): layer labels with
            their type and shape.
    """
    plt = _plt()
    if axes is None:
        fig, axes = plt.subplots(1, len(terms), figsize=(4.2 * len(terms), 3.4), squeeze=False)
        axes = axes[0]
    fig = axes[0].figure
    layers = list(layers) if layers is not None else layer_names(record)
    t = record["t"].to_numpy()
    for ax, spec in zip(axes, (term_spec(name) for name in terms)):
        for k, name in enumerate(layers):
            ax.plot(t, _smooth(record[layer_column(spec.name, name)].to_numpy(), smooth), lw=0.8,
                    color=f"C{k % 10}", label=layer_label(record, name, metadata))
        if spec.network is not None and spec.network in record:
            ax.plot(t, _smooth(record[spec.network].to_numpy(), smooth), lw=1.4, color="k", label="network (Thm 15)")
        ax.set_title(spec.label, fontsize=10)
        ax.set_xlabel(TIME_LABEL)
        ax.set_ylabel(f"{spec.label} (per unit t)", fontsize=9)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig, axes


def plot_noise_split(record, ax=None, smooth: int = 1, title: Optional[str] = None):
    """κ_Z split into its variance and covariance parts (Prop 6, Fig 3).

    The network columns ``noise_curvature_var_Z`` and ``noise_curvature_cov_Z`` when the
    record has them (they count a tied weight as its factor σ1^c of K), else the sums of
    the per-layer columns.
    """
    fig, ax = _axes(ax)
    t = record["t"].to_numpy()
    var, cov = term_spec("noise_curvature_var"), term_spec("noise_curvature_cov")
    if var.network in record and cov.network in record:
        kv = record[var.network].to_numpy()
        kc = record[cov.network].to_numpy()
    else:
        kv = record[[c for c in record.columns if c.startswith(f"{var.column}/")]].sum(axis=1).to_numpy()
        kc = record[[c for c in record.columns if c.startswith(f"{cov.column}/")]].sum(axis=1).to_numpy()
    ax.plot(t, _smooth(kv + kc, smooth), color="k", lw=1.2, label="κ_Z")
    ax.plot(t, _smooth(kv, smooth), color="C1", lw=1, label="κ_Z from variances (diag Σ)")
    ax.plot(t, _smooth(kc, smooth), color="C4", lw=1, label="κ_Z from covariances")
    ax.set_xlabel(TIME_LABEL)
    ax.set_ylabel("κ_Z (per unit t)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig, ax


def plot_simulation(t, quantiles: dict, ax=None, observed=None, mean=None, label: str = "SDE",
                    color: str = "C3", title: Optional[str] = None):
    """Monte Carlo band of simulated K(t) (quantiles) with optional observed runs.

    Args:
        t: times of the simulation.
        quantiles: mapping q → array of K quantiles (e.g. {0.025: ..., 0.5: ..., 0.975: ...}).
        ax: Axes.
        observed: (t_obs, K_obs) or a list of such pairs (real SGD runs).
        mean: simulated E[K(t)].
        label: legend label.
        color: band colour.
        title: axes title.
    """
    fig, ax = _axes(ax)
    qs = sorted(quantiles)
    lo, hi = quantiles[qs[0]], quantiles[qs[-1]]
    ax.fill_between(t, lo, hi, color=color, alpha=0.18, label=f"{label} {qs[0]:.1%}–{qs[-1]:.1%}")
    if 0.5 in quantiles:
        ax.plot(t, quantiles[0.5], color=color, lw=1, ls=":", label=f"{label} median")
    if mean is not None:  # dashed on top: the Thm 17 mean it should match stays visible between the dashes
        ax.plot(t, mean, color=color, lw=1.6, ls=(0, (4, 3)), label=f"{label} mean", zorder=4)
    if observed is not None:
        runs = observed if isinstance(observed, list) else [observed]
        for k, (to, ko) in enumerate(runs):
            ax.plot(to, ko, color="k", lw=0.6, alpha=0.8 if len(runs) == 1 else 0.35,
                    label="observed" if k == 0 else None)
    ax.set_xlabel(TIME_LABEL)
    ax.set_ylabel("K(t)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig, ax


def summary_figure(record, pred, simulation=None, title: Optional[str] = None, smooth: int = 1,
                   metadata: Optional[dict] = None):
    """The demo figure: prediction vs observation (and SDE band) on top, the terms below.

    ``metadata`` (the record's, :func:`sdelip.record.load_metadata`) labels the layers with their
    type and shape and, without a ``title``, titles the figure with what the run was (:func:`run_title`).
    """
    if title is None and metadata is not None:
        title = run_title(metadata, record)
    plt = _plt()
    fig = plt.figure(figsize=(13, 7.5))
    gs = fig.add_gridspec(2, 3, height_ratios=[1.25, 1])
    ax_top = fig.add_subplot(gs[0, :2])
    plot_prediction(pred, ax=ax_top, title="K(t): observed vs Thm 16–17 prediction")
    if simulation is not None:
        plot_simulation(simulation["t"], simulation["quantiles"], ax=ax_top, mean=simulation.get("mean"),
                        label=simulation.get("label", "SDE Monte Carlo"))
    ax_split = fig.add_subplot(gs[0, 2])
    plot_noise_split(record, ax=ax_split, smooth=smooth, title="κ split (Prop 6)")
    axes = [fig.add_subplot(gs[1, k]) for k in range(3)]
    plot_terms(record, axes=axes, smooth=smooth, metadata=metadata)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig, path) -> str:
    """Save a figure as PNG (150 dpi) and close it; returns the path."""
    path = str(path)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    _plt().close(fig)
    return path


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or x.size < window:
        return x
    kernel = np.ones(window) / window
    pad = np.concatenate([np.full(window - 1, x[0]), x])
    return np.convolve(pad, kernel, mode="valid")
