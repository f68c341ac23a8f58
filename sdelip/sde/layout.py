"""The state layout of the SDE systems: a model's trainable parameters as one flat vector per trajectory.

:class:`ParamLayout` maps the parameters to and from a flat vector, block by block (one
block per owning module: the noise blocks of Assumption 3), and names the block of
every tracked weight.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import attrs
import torch
from torch import nn

from ..rules.inventory import TrackedLayer

__all__ = ["ParamSpec", "ParamBlock", "ParamLayout"]


@attrs.frozen
class ParamSpec:
    """One trainable parameter inside the flattened state vector.

    Attributes:
        name: parameter name as in ``model.named_parameters()``.
        shape: its shape.
        start, stop: its slice of the flattened vector (row-major flattening).
        block: index of the :class:`ParamBlock` it belongs to.
    """

    name: str
    shape: torch.Size
    start: int
    stop: int
    block: int


@attrs.frozen
class ParamBlock:
    """The parameters of one module, driven by one M-dimensional Brownian motion.

    Assumption 3 makes the gradient noise block-diagonal across layers; a tracked
    layer's weight and bias share the layer's block (the same per-sample rows drive
    both, which is the exact joint noise of the two).

    Attributes:
        module: module path ('' for the root module).
        params: the names of its trainable parameters.
        start, stop: the block's contiguous slice of the flattened state.
        layer: index of the (first) tracked layer whose weight the module holds, else None.
    """

    module: str
    params: tuple
    start: int
    stop: int
    layer: Optional[int]


class ParamLayout:
    """Maps a model's trainable parameters to and from a flat vector (per trajectory).

    Parameters are ordered block by block (one block per owning module, in
    ``named_parameters`` order), so every block is a contiguous slice.

    Args:
        model: the network.
        layers: its tracked layers (:func:`sdelip.tracked_layers`).
    """

    def __init__(self, model: nn.Module, layers: Sequence[TrackedLayer]):
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        owners: Dict[str, list] = {}
        for name, p in trainable:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            owners.setdefault(owner, []).append((name, p))
        self.weight_names = [layer.parameter_name for layer in layers]
        owner_of = {wn: (wn.rsplit(".", 1)[0] if "." in wn else "") for wn in self.weight_names}
        layer_index: Dict[str, int] = {}
        for i, wn in enumerate(self.weight_names):
            layer_index.setdefault(owner_of[wn], i)
        specs, blocks, offset = [], [], 0
        for owner, plist in owners.items():
            start = offset
            for name, p in plist:
                specs.append(ParamSpec(name, p.shape, offset, offset + p.numel(), len(blocks)))
                offset += p.numel()
            blocks.append(ParamBlock(owner, tuple(n for n, _ in plist), start, offset, layer_index.get(owner)))
        names = {s.name for s in specs}
        for wn in self.weight_names:
            if wn not in names:
                raise ValueError(f"tracked weight {wn!r} is not a trainable parameter of the model")
        self.specs: list = specs
        self.blocks: list = blocks
        block_of = {owner: b for b, owner in enumerate(owners)}
        #: the noise block of each tracked layer (the block of the module holding its weight)
        self.layer_blocks: list = [block_of[owner_of[wn]] for wn in self.weight_names]
        self.size: int = offset
        self._by_name = {s.name: s for s in specs}
        self.frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}

    def __getitem__(self, name: str) -> ParamSpec:
        return self._by_name[name]

    def flatten_model(self, model: nn.Module) -> torch.Tensor:
        """The model's current trainable parameters as one detached vector (P,)."""
        params = dict(model.named_parameters())
        return torch.cat([params[s.name].detach().reshape(-1) for s in self.specs])

    def unflatten(self, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Split (..., P) into {name: (..., *shape)} views."""
        lead = theta.shape[:-1]
        return {s.name: theta[..., s.start : s.stop].reshape(*lead, *s.shape) for s in self.specs}

    def flatten(self, tensors: Dict[str, torch.Tensor], lead: int = 1) -> torch.Tensor:
        """Concatenate {name: (*lead_dims, *shape)} into (*lead_dims, P); ``lead`` leading dims."""
        parts = []
        for s in self.specs:
            x = tensors[s.name]
            parts.append(x.reshape(*x.shape[:lead], -1))
        return torch.cat(parts, -1)
