"""The metadata of a tracked run, as written to its record: model, layers, options, versions, machine."""

from __future__ import annotations

import datetime
import platform
from typing import Any, Mapping, Optional

import numpy as np
import torch

from ..engines import coupling_modules

__all__ = ["build_metadata", "layer_metadata", "versions"]


def versions() -> dict:
    """The versions of sdelip and of the libraries whose numbers it depends on."""
    import pandas

    try:
        from importlib.metadata import version

        sdelip_version = version("sdelip")
    except Exception:  # pragma: no cover - not installed
        sdelip_version = "unknown"
    return {
        "sdelip": sdelip_version,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "python": platform.python_version(),
    }


def layer_metadata(layer) -> dict:
    """A layer's entry in the record metadata; other weights than a module's ``.weight`` add their parameter and
    rule, tied weights their uses and the other modules."""
    out = {"name": layer.name, "kind": layer.kind, "shape": list(layer.shape)}
    if layer.attr != "weight" or layer.rule.name == "fallback":
        out.update(parameter=layer.attr, rule=layer.rule.name)
    if layer.uses > 1:
        out.update(uses=layer.uses, aliases=list(layer.aliases), calls=list(layer.calls))
    return out


def build_metadata(tracker, user: Optional[Mapping[str, Any]], seed: Optional[int]) -> dict:
    """The run metadata of a :class:`~sdelip.tracking.tracker.Tracker` (``user`` entries override)."""
    model = tracker.model
    ref = tracker.layers[0].weight
    lr0, wds = tracker.optim.hyperparameters(0)
    meta = {
        "format": "sdelip-record-1",
        "model": type(model).__name__,
        "model_summary": repr(model),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "layers": [layer_metadata(l) for l in tracker.layers],
        "left_out": [{"name": o.name, "shape": list(o.shape), "reason": o.reason} for o in tracker.left_out],
        "unsupported": tracker.unsupported,
        "lr": lr0,
        "weight_decay": wds,
        "optimizer": tracker.optim.metadata(),
        "engine": tracker.engine.name,
        "engine_requested": tracker.engine_requested,
        "coupling_modules": coupling_modules(model),
        "schedule": tracker.schedule.describe(),
        "split": tracker.split,
        "decomposition": tracker.decomposition,
        "gap_tol": tracker.gap_tol,
        "on_degenerate": tracker.on_degenerate,
        "extra_noise_var": tracker.extra_noise_var,
        "probe_every": tracker.probe_every,
        "batch_size": None,
        "precision": None,  # of the tracked forward passes, set at the first tracked step (autocast noted)
        "seed": int(seed) if seed is not None else int(torch.initial_seed()),
        "versions": versions(),
        "device": str(ref.device),
        "dtype": str(ref.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bound": "K = prod of tracked layers' operator norms (Prop 8-9): activations 1-Lipschitz, "
                 "skip connections ignored",
    }
    if user:
        meta.update(dict(user))
    return meta
