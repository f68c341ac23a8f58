"""Sec 8.2: the initial Lipschitz bound K(0) against the random-matrix prediction.

For a weight matrix θ ∈ R^{m×n} with iid entries of standard deviation s, the largest
singular value tends to s(√m + √n) (Bai–Yin / Tracy–Widom edge), so the product bound of
Prop 8 starts at

    K(0) ≈ Π_ℓ s_ℓ (√m_ℓ + √n_ℓ).

This script initialises the paper's MLP (Table 2) and ConvNet (Table 1), and wider
variants of both, under three schemes and reports the observed σ1 per layer and K(0)
per network against the prediction, as ratios (mean ± sd over initialisation seeds):

* ``default`` — PyTorch's ``reset_parameters``: Kaiming-uniform with a = √5, i.e.
  U(−1/√n, 1/√n), so s = 1/√(3n);
* ``kaiming`` — Kaiming normal, s = √(2/n);
* ``normal(s)`` — N(0, s²) with fixed s (0.02 and 0.05 by default).

n is the fan-in (the column count of the reshaped weight: ``in_features`` for Linear,
``in_channels·kh·kw`` for Conv2d) and m the row count (``out_features`` / ``out_channels``).
For convolutions σ1 is that of the reshaped (out × in·kh·kw) kernel matrix that Prop 9
tracks, not the operator norm of the convolution on images.

No data and no training are involved: the numbers depend only on the layer shapes.

Run ``python experiments/init_scaling.py --quick`` (seconds) or ``--paper`` (more seeds,
more widths).
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from pathlib import Path

import attrs

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repo on sys.path)
import reporting  # noqa: E402

NAME = "init_scaling"

#: Widths of the paper's ConvNet (Table 1): conv channels and the hidden Linear size.
PAPER_CONV_CHANNELS = (32, 64, 128)
PAPER_CONV_HIDDEN = 256
#: The paper's MLP (Table 2).
PAPER_MLP_SIZES = (784, 512, 256, 10)


def settings(scale: str) -> dict:
    """Models, schemes and seeds for a scale.

    Args:
        scale: ``"tiny"``, ``"quick"`` or ``"paper"``.

    Returns:
        dict with ``models`` (name → spec), ``normal_stds`` and ``seeds``.
    """
    mlp = {"kind": "mlp", "sizes": PAPER_MLP_SIZES}
    mlp_wide = {"kind": "mlp", "sizes": (784, 2048, 1024, 10)}
    mlp_wider = {"kind": "mlp", "sizes": (784, 4096, 4096, 10)}
    conv = {"kind": "convnet", "in_channels": 3, "num_classes": 10, "channels": PAPER_CONV_CHANNELS,
            "hidden": PAPER_CONV_HIDDEN}
    conv_wide = dict(conv, channels=tuple(2 * c for c in PAPER_CONV_CHANNELS), hidden=2 * PAPER_CONV_HIDDEN)
    conv_c100 = dict(conv, num_classes=100)
    tiny_mlp = {"kind": "mlp", "sizes": (64, 48, 10)}
    tiny_conv = dict(conv, channels=(4, 8, 16), hidden=32)
    models = common.pick(
        scale,
        tiny=OrderedDict([("mlp-tiny", tiny_mlp), ("convnet-tiny", tiny_conv)]),
        quick=OrderedDict([("mlp", mlp), ("mlp-wide", mlp_wide), ("convnet", conv), ("convnet-wide", conv_wide)]),
        paper=OrderedDict([("mlp", mlp), ("mlp-wide", mlp_wide), ("mlp-wider", mlp_wider), ("convnet", conv),
                           ("convnet-c100", conv_c100), ("convnet-wide", conv_wide)]),
    )
    return {
        "models": models,
        "normal_stds": common.pick(scale, tiny=(0.05,), quick=(0.02, 0.05), paper=(0.01, 0.02, 0.05)),
        "seeds": common.pick(scale, tiny=2, quick=5, paper=20),
    }


def conv_net(in_channels: int, num_classes: int, channels=PAPER_CONV_CHANNELS, hidden: int = PAPER_CONV_HIDDEN):
    """The Table 1 ConvNet layout with configurable widths (no dropout, no batchnorm).

    With the default widths the layer shapes equal those of :class:`sdelip.workbench.models.ConvNet`
    (checked in :func:`build`); other widths give the "wider" variants.
    """
    from torch import nn

    c1, c2, c3 = channels
    features = OrderedDict(
        conv1=nn.Conv2d(in_channels, c1, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2, 2),
        conv2=nn.Conv2d(c1, c2, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2, 2),
        conv3=nn.Conv2d(c2, c3, 3, padding=1, stride=2), relu3=nn.ReLU(),
    )
    classifier = OrderedDict(flatten=nn.Flatten(1), fc1=nn.Linear(c3 * 4 * 4, hidden), relu4=nn.ReLU(),
                             fc2=nn.Linear(hidden, num_classes))
    return nn.Sequential(OrderedDict(features=nn.Sequential(features), classifier=nn.Sequential(classifier)))


def build(spec: dict):
    """An uninitialised-by-us model from a spec (the paper's classes where they fit)."""
    from sdelip.workbench.models import MLP, ConvNet

    if spec["kind"] == "mlp":
        return MLP(spec["sizes"])
    if tuple(spec["channels"]) == PAPER_CONV_CHANNELS and spec["hidden"] == PAPER_CONV_HIDDEN:
        model = ConvNet(spec["in_channels"], spec["num_classes"])
        mirror = conv_net(spec["in_channels"], spec["num_classes"])
        assert [p.shape for p in model.parameters()] == [p.shape for p in mirror.parameters()]
        return model
    return conv_net(spec["in_channels"], spec["num_classes"], spec["channels"], spec["hidden"])


def scheme_std(scheme: str, fan_in: int, std=None) -> float:
    """The entry standard deviation s of a scheme for a layer with fan-in n.

    Args:
        scheme: ``"default"``, ``"kaiming"`` or ``"normal"``.
        fan_in: n, the column count of the reshaped weight.
        std: s for ``"normal"``.
    """
    if scheme == "default":
        return 1.0 / math.sqrt(3.0 * fan_in)  # U(−1/√n, 1/√n)
    if scheme == "kaiming":
        return math.sqrt(2.0 / fan_in)
    if scheme == "normal":
        return float(std)
    raise ValueError(f"unknown scheme {scheme!r}")


def sigma1(W) -> float:
    """Largest singular value of a float64 matrix via the eigenvalues of its smaller Gram matrix.

    Much faster than a full SVD for the wide layers on a CPU; in float64 the squared
    condition number costs nothing at the top of the spectrum.
    """
    import torch

    G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    return float(torch.linalg.eigvalsh(G)[-1].clamp_min(0.0).sqrt())


def measure(model, scheme: str, std, seed: int) -> list[dict]:
    """Initialise ``model`` and return per-layer (name, m, n, s, predicted σ1, observed σ1)."""
    import torch

    from sdelip.rules.inventory import tracked_layers
    from sdelip.workbench.models import init_weights

    init_weights(model, scheme, std=std, generator=torch.Generator().manual_seed(seed))
    rows = []
    with torch.no_grad():
        for layer in tracked_layers(model):
            W = layer.matrix().detach().double()
            m, n = W.shape
            s = scheme_std(scheme, n, std)
            rows.append({"layer": layer.name, "m": m, "n": n, "s": s,
                         "sigma1_pred": s * (math.sqrt(m) + math.sqrt(n)),
                         "sigma1": sigma1(W),
                         "entry_std": float(W.std())})
    return rows


def _mean_sd(values) -> tuple[float, float]:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def schemes(cfg: dict) -> list[tuple]:
    """(scheme, std) pairs: default, kaiming and normal(s) for each configured s."""
    return [("default", None), ("kaiming", None)] + [("normal", s) for s in cfg["normal_stds"]]


def scheme_label(scheme: str, std) -> str:
    """``"default"``, ``"kaiming"`` or ``"normal(<s>)"``."""
    return scheme if std is None else f"normal({std:g})"


def measure_task(config: dict, workdir: Path) -> dict:
    """Sweep task: the per-layer measurements of one (model, scheme) for every seed.

    Args:
        config: ``{"spec": model spec, "scheme": str, "std": float | None, "seeds": int}``.
        workdir: unused (nothing is written).

    Returns:
        ``{"per_seed": [[layer row, ...] per seed]}`` (see :func:`measure`).
    """
    model = build(config["spec"])
    return {"per_seed": [measure(model, config["scheme"], config["std"], seed) for seed in range(config["seeds"])]}


def tasks(args) -> list:
    """One task per (model, scheme)."""
    from sdelip.workbench.sweep import Task

    cfg = settings(args.scale)
    return [Task(name=f"{model_name}/{scheme_label(scheme, std)}", fn=measure_task,
                 config={"spec": spec, "scheme": scheme, "std": std, "seeds": cfg["seeds"]})
            for model_name, spec in cfg["models"].items() for scheme, std in schemes(cfg)]


@attrs.frozen
class Measurements:
    """The finished tasks as tables (:func:`collect`).

    Attributes:
        network: one row per (model, scheme): K(0) observed over the seeds against predicted.
        layers: one row per (model, scheme, layer): σ1 observed against predicted.
        cfg: the scale's settings (:func:`settings`).
    """

    network: list
    layers: list
    cfg: dict


def collect(scale: str, results: dict) -> Measurements:
    """Every (model, scheme, seed) from the finished tasks."""
    cfg = settings(scale)
    net_rows, layer_rows = [], []
    for model_name in cfg["models"]:
        for scheme, std in schemes(cfg):
            label = scheme_label(scheme, std)
            per_seed = results[f"{model_name}/{label}"].value["per_seed"]
            K = [math.prod(r["sigma1"] for r in layers) for layers in per_seed]
            K_pred = math.prod(r["sigma1_pred"] for r in per_seed[0])
            ratio_mean, ratio_sd = _mean_sd([k / K_pred for k in K])
            K_mean, K_sd = _mean_sd(K)
            worst = min(per_seed[0], key=lambda r: min(r["m"], r["n"]))
            net_rows.append({
                "model": model_name, "scheme": label, "layers": len(per_seed[0]),
                "shapes": " ".join(f"{r['m']}x{r['n']}" for r in per_seed[0]),
                "seeds": cfg["seeds"], "K0_pred": K_pred, "K0_mean": K_mean, "K0_sd": K_sd,
                "ratio_mean": ratio_mean, "ratio_sd": ratio_sd,
                "smallest_layer": f"{worst['layer']} ({worst['m']}x{worst['n']})",
            })
            for i, first in enumerate(per_seed[0]):
                sig = [layers[i]["sigma1"] for layers in per_seed]
                s_mean, s_sd = _mean_sd(sig)
                r_mean, r_sd = _mean_sd([v / first["sigma1_pred"] for v in sig])
                layer_rows.append({
                    "model": model_name, "scheme": label, "layer": first["layer"], "m": first["m"], "n": first["n"],
                    "s": first["s"], "sigma1_pred": first["sigma1_pred"], "sigma1_mean": s_mean, "sigma1_sd": s_sd,
                    "ratio_mean": r_mean, "ratio_sd": r_sd,
                })
    return Measurements(network=net_rows, layers=layer_rows, cfg=cfg)


def plot(net_rows, layer_rows, out: Path) -> list[Path]:
    """Observed against predicted K(0), and per-layer σ1 ratios against layer size."""
    import numpy as np

    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    from sdelip.analysis.plotting import save_figure

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    schemes = list(dict.fromkeys(r["scheme"] for r in net_rows))
    markers = dict(zip(dict.fromkeys(r["model"] for r in net_rows), "osD^v<>"))
    for k, scheme in enumerate(schemes):
        for r in (r for r in net_rows if r["scheme"] == scheme):
            ax.errorbar(r["K0_pred"], r["K0_mean"], yerr=r["K0_sd"], fmt=markers[r["model"]], color=f"C{k}",
                        label=scheme if r is next(q for q in net_rows if q["scheme"] == scheme) else None)
    lo = min(min(r["K0_pred"], r["K0_mean"]) for r in net_rows)
    hi = max(max(r["K0_pred"], r["K0_mean"]) for r in net_rows)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="observed = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"predicted $K(0)=\prod_\ell s_\ell(\sqrt{m_\ell}+\sqrt{n_\ell})$")
    ax.set_ylabel(r"observed $K(0)=\prod_\ell\sigma_1^{(\ell)}$ (mean ± sd)")
    ax.set_title("Network K(0), markers: " + ", ".join(f"{m} {s}" for m, s in markers.items()), fontsize=8)
    ax.legend(fontsize=8)
    ax = axes[1]
    for k, scheme in enumerate(schemes):
        rows = [r for r in layer_rows if r["scheme"] == scheme]
        x = np.array([min(r["m"], r["n"]) for r in rows], float)
        ax.errorbar(x * (1 + 0.04 * k), [r["ratio_mean"] for r in rows], yerr=[r["ratio_sd"] for r in rows],
                    fmt="o", color=f"C{k}", ms=4, label=scheme)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("min(m, n) of the layer")
    ax.set_ylabel(r"$\sigma_1 / [s(\sqrt{m}+\sqrt{n})]$")
    ax.set_title("Per-layer ratio (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(Path(save_figure(fig, out / "init_scaling.png")))
    return paths


def reduce(args, results: dict, out: Path) -> dict:
    """The network and per-layer tables, the figure and ``summary.json`` from the finished tasks."""
    measured = collect(args.scale, results)
    net_rows, layer_rows, cfg = measured.network, measured.layers, measured.cfg
    seconds = sum(r.seconds for r in results.values())
    ratios = [r["ratio_mean"] for r in net_rows]
    layer_ratios = [r["ratio_mean"] for r in layer_rows]
    big = [r for r in layer_rows if min(r["m"], r["n"]) >= 32]
    small = [r for r in layer_rows if min(r["m"], r["n"]) < 32]
    notes = [
        f"Scale: {args.scale}; {cfg['seeds']} initialisation seeds per (model, scheme); {seconds:.1f} s of tasks.",
        "Data: none (K(0) depends only on the layer shapes and the initialisation).",
        "Schemes: default = PyTorch reset_parameters, U(−1/√n, 1/√n), s = 1/√(3n); kaiming = N(0, 2/n); "
        "normal(s) = N(0, s²). n = fan-in (in·kh·kw for Conv2d), m = rows (out channels).",
        "Conv layers use the σ1 of the reshaped out × (in·kh·kw) kernel (Prop 9's matrix), not the operator norm "
        "of the convolution on images.",
        f"Network ratio observed/predicted: {min(ratios):.3f} … {max(ratios):.3f} over {len(net_rows)} "
        "(model, scheme) pairs.",
        f"Per-layer ratios: {min(layer_ratios):.3f} … {max(layer_ratios):.3f}; layers with min(m, n) ≥ 32: "
        + (f"{min(r['ratio_mean'] for r in big):.3f} … {max(r['ratio_mean'] for r in big):.3f}" if big else "none")
        + "; layers with min(m, n) < 32 (e.g. the 10-class heads): "
        + (f"{min(r['ratio_mean'] for r in small):.3f} … {max(r['ratio_mean'] for r in small):.3f}" if small else "none")
        + ". The s(√m + √n) limit is asymptotic; small layers sit below it (finite-size Tracy–Widom shift).",
        "kaiming and normal(s) draw the same standard-normal matrices for a seed (only the scale differs), so "
        "their ratios coincide; default draws uniform entries.",
        "Per-layer numbers: layers.csv / layers.md.",
    ]
    reporting.write_table(layer_rows, out, stem="layers", title="Sec 8.2: per-layer σ1 at initialisation",
                       notes=notes[:4])
    csv_path, md_path = reporting.write_table(net_rows, out, stem="summary",
                                           title="Sec 8.2: K(0) against Π s(√m + √n)", notes=notes)
    figs = plot(net_rows, layer_rows, out)
    summary = {"scale": args.scale, "seconds": seconds, "ratio_min": min(ratios), "ratio_max": max(ratios),
               "rows": net_rows}
    reporting.write_json(summary, out / "summary.json")
    print(md_path.read_text())
    return {"summary": summary, "csv": csv_path, "md": md_path, "figures": figs}


def main(argv=None) -> dict:
    """Run the experiment (see :func:`common.run_experiment`); returns the headline numbers and output paths."""
    return common.run_experiment(NAME, __doc__.splitlines()[0], tasks, reduce, argv)


if __name__ == "__main__":
    main()
