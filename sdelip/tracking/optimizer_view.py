"""What the tracker reads from the optimizer: η and the weight decay of each tracked weight (Def 4, docs/theory.md §6).

The theory is plain SGD. :class:`OptimizerView` maps every tracked weight to its param
group, reads η and the SGD weight decay in effect for each update, refuses tracked
layers with different learning rates (the SDE time t = Σ η needs one η) and warns
(:class:`NotPlainSGDWarning`) for momentum, Nesterov or another optimizer. It also counts
the tracker's backward passes between ``optimizer.step()`` calls, so that gradient
accumulation is refused instead of counting each micro-batch as an SGD step.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["OptimizerView", "NotPlainSGDWarning"]


class NotPlainSGDWarning(UserWarning):
    """The optimizer is not plain SGD (momentum, Nesterov, Adam, …): Thm 14 assumes plain SGD."""


class OptimizerView:
    """The optimizer as the tracker sees it.

    Args:
        optimizer: the optimizer stepping the model, or None.
        layers: the tracked layers.
        lr: the learning rate when ``optimizer`` is None.

    Raises:
        ValueError: no optimizer and no ``lr``; a tracked weight that the optimizer does
            not train (named).
    """

    def __init__(self, optimizer: Optional[torch.optim.Optimizer], layers: Sequence, lr: Optional[float] = None):
        self.optimizer = optimizer
        self.layers = list(layers)
        self.lr_override = None if lr is None else float(lr)
        self.groups = self._map_param_groups()
        self.backwards_since_step = 0

    def _map_param_groups(self) -> dict[str, int]:
        groups = {}
        if self.optimizer is None:
            if self.lr_override is None:
                raise ValueError("without an optimizer the tracker needs the learning rate: Tracker(model, None, lr=...)")
            return groups
        where = {}
        for gi, g in enumerate(self.optimizer.param_groups):
            for p in g["params"]:
                where[id(p)] = gi
        for layer in self.layers:
            gi = where.get(id(layer.weight))
            if gi is None:
                raise ValueError(
                    f"the weight of layer {layer.name!r} is not optimised by the optimizer: the tracked layers "
                    "must be trained by the optimizer whose learning rate η sets the SDE time"
                )
            groups[layer.name] = gi
        return groups

    def warn(self, stacklevel: int = 3) -> None:
        """:class:`NotPlainSGDWarning` for another optimizer than SGD, or SGD with momentum."""
        opt = self.optimizer
        if opt is None:
            return
        if not isinstance(opt, torch.optim.SGD):
            warnings.warn(
                f"the optimizer is {type(opt).__name__}, not plain SGD: the theory (Def 4, Thm 14) models plain "
                "SGD; the tracker computes the terms as for plain SGD with η = the group's lr and no weight decay",
                NotPlainSGDWarning,
                stacklevel=stacklevel + 1,
            )
            return
        for gi in sorted(set(self.groups.values())):
            g = opt.param_groups[gi]
            if g.get("momentum", 0) or g.get("nesterov", False):
                warnings.warn(
                    f"SGD with momentum={g.get('momentum', 0)} (nesterov={g.get('nesterov', False)}): the theory "
                    "(Def 4, Thm 14) models plain SGD without momentum; the tracker computes the terms as for plain "
                    "SGD with η = lr, which does not describe the momentum dynamics",
                    NotPlainSGDWarning,
                    stacklevel=stacklevel + 1,
                )
                return

    def hyperparameters(self, step: int) -> tuple[float, dict[str, float]]:
        """η and the per-layer weight decay in effect for update ``step``."""
        if self.optimizer is None:
            return self.lr_override, {l.name: 0.0 for l in self.layers}
        lrs, wds = {}, {}
        sgd = isinstance(self.optimizer, torch.optim.SGD)
        for layer in self.layers:
            g = self.optimizer.param_groups[self.groups[layer.name]]
            lr = g["lr"]
            lrs[layer.name] = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
            wds[layer.name] = float(g.get("weight_decay", 0.0)) if sgd else 0.0
        values = set(lrs.values())
        if len(values) > 1:
            raise ValueError(
                f"step {step}: the tracked layers have different learning rates {lrs}; the SDE time t = kη "
                "(Thm 14) needs one η for all tracked layers"
            )
        lr = values.pop()
        if not (lr > 0 and np.isfinite(lr)):
            raise ValueError(f"step {step}: the learning rate must be positive and finite, got {lr!r}")
        return lr, wds

    def metadata(self) -> Optional[dict]:
        """The optimizer's class and param-group hyper-parameters, for the record."""
        opt = self.optimizer
        if opt is None:
            return None
        return {
            "class": type(opt).__name__,
            "param_groups": [
                {k: (v if isinstance(v, (int, float, bool, str, type(None))) else repr(v))
                 for k, v in g.items() if k != "params"}
                for g in opt.param_groups
            ],
        }

    def attach(self) -> list:
        """A step post-hook that resets the backward count (None-safe); returns its handles."""
        if self.optimizer is not None and hasattr(self.optimizer, "register_step_post_hook"):
            return [self.optimizer.register_step_post_hook(self._stepped)]
        return []

    def _stepped(self, *args) -> None:
        self.backwards_since_step = 0
