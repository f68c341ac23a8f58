"""The factored engine: per-sample statistics from the hooks of the user's own backward.

For a Linear layer the per-sample gradient is g_i = δ_i x_iᵀ, with x_i the layer input
and δ_i = ∂ℓ_i/∂(output_i); with a sequence or spatial axis p, g_i = Σ_p δ_ip x_ipᵀ. For
Conv2d the x_ip are the unfolded input patches (in·kh·kw) and δ_ip the output gradients
at position p (THEORY.md §6). A forward hook keeps a reference to x (autograd keeps it
anyway for the weight gradient) and a tensor hook on the output receives δ during the
step's ordinary backward of ``losses.mean()``, which hands it δ_i / M — the engine
multiplies back by M. Dropout needs no special care: the hooks see the very forward
pass whose masks produced the loss.

Linear, no position axis — O(M(m + n)) memory, no per-sample matrix at all:

    g_i v1 = δ_i (x_i · v1),   g_iᵀ u1 = x_i (δ_i · u1),
    Σ_i g_i = δᵀ x,            Σ_i g_i ∘ g_i = (δ ∘ δ)ᵀ (x ∘ x).

Conv2d (and Linear with a position axis) — the projections need only the patches:

    g_i v1 = Σ_p δ_ip (x_ip · v1),   g_iᵀ u1 = Σ_p x_ip (δ_ip · u1),

computed by two thin convolutions (large feature maps) or from the unfolded patches.
The diagonal of Σ̂ needs Σ_i g_i ∘ g_i, for which the per-sample gradients of that one
layer are formed — by a grouped convolution backward in which the samples are the
groups (feature maps of at least :data:`GROUPED_CONV_MIN_POSITIONS` positions), else by
unfold + batched matrix product — a chunk of samples at a time (memory bounded by
``chunk_bytes``), reduced and dropped. Grouped, strided, dilated and padded
convolutions (any padding mode) are supported.

Σ_i g_i is M times the weight gradient that the same backward accumulates; it is read
from ``weight.grad`` (minus what was there before) unless a hook on the weight or a
second module sharing it could make the two differ, in which case the engine computes it.

The hook runs inside autograd's backward, right after δ of the layer is computed, and
releases its reference to the layer input, so the extra memory is one chunk.

Tied weights (one Parameter applied c > 1 times, by several modules or by one module
called several times) are the position-axis case once more: g_i = Σ_uses δ_i,use x_i,useᵀ.
The projections g_i v1 and g_iᵀ u1 are additive over the uses, Σ_i g_i ∘ g_i is not, so
the hook keeps each use's (x, δ) and the layer's statistics are computed once the
backward has returned (:func:`multi_use_statistics`), from per-sample gradients of that
one layer summed over the uses, a chunk of samples at a time. Until then the inputs of
every use stay in memory (autograd keeps them until the weight gradient anyway).

The engine sees a weight only through the forward hooks of the tracked modules holding
it: a weight that another kind of module also holds (an nn.Embedding tied to the output
layer) is refused (:meth:`FactoredEngine.check_applicable`), and a functional use such as
``F.linear(x, layer.weight)`` outside the module is not seen at all.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TrackedLayer
from ..spectral import weight_matrix
from .base import (
    DEFAULT_CHUNK_BYTES,
    Engine,
    EngineError,
    EngineNotApplicableError,
    LayerStatistics,
    StatisticsAccumulator,
    untracked_weight_users,
)

__all__ = [
    "FactoredEngine",
    "linear_statistics",
    "sequence_linear_statistics",
    "patch_statistics",
    "conv2d_statistics",
    "module_statistics",
    "multi_use_statistics",
    "per_sample_weight_grads",
]


def linear_statistics(x: torch.Tensor, delta: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor, split: bool,
                      with_sum_g: bool = True) -> LayerStatistics:
    """Statistics of a Linear layer from inputs x (M, n) and output gradients δ (M, m).

    g_i = δ_i x_iᵀ; nothing of size M·m·n is formed. ``with_sum_g=False`` leaves Σ g_i
    to the caller (it is M times the weight gradient of the mean loss).
    """
    M = x.shape[0]
    xv = x @ v1  # (M,)
    du = delta @ u1  # (M,)
    Gv = delta * xv[:, None]
    Gtu = x * du[:, None]
    sum_g = sum_sq = None
    if split:
        if with_sum_g:
            sum_g = delta.mT @ x
        sum_sq = delta.square().mT @ x.square()
    return LayerStatistics(M, Gv, Gtu, sum_g, sum_sq)


def patch_statistics(
    Xt: torch.Tensor,
    Dt: torch.Tensor,
    u1: torch.Tensor,
    v1: torch.Tensor,
    split: bool,
    groups: int = 1,
    out: Optional[dict] = None,
    start: int = 0,
) -> None:
    """Accumulate statistics of g_i = Σ_p δ_ip x_ipᵀ for a chunk of samples.

    Args:
        Xt: (c, g·Kg, P) patches, channels first (the layout of ``F.unfold``).
        Dt: (c, g·Og, P) output gradients.
        u1: (g·Og,) and v1: (Kg,) the top singular pair of the (O, Kg) weight matrix.
        split: also accumulate Σ g_i and Σ g_i ∘ g_i.
        groups: g, the number of convolution groups (block structure of g_i).
        out: dict with preallocated ``Gv`` (M, O), ``Gtu`` (M, Kg) and, with split,
            ``sum_g``, ``sum_sq`` (O, Kg), updated in place.
        start: index of the chunk's first sample.
    """
    c, K, P = Xt.shape
    O = Dt.shape[1]
    g = groups
    Kg, Og = K // g, O // g
    if g > 1:
        Xt = Xt.reshape(c * g, Kg, P)
        Dt = Dt.reshape(c * g, Og, P)
    # Projections from the patches cost P·(Kg + Og) per sample, from the per-sample gradient Og·Kg.
    from_patches = not split or P * (Kg + Og) < Og * Kg
    if split:
        G = torch.bmm(Dt, Xt.mT)  # (c·g, Og, Kg): the per-sample gradients of this chunk
        if g > 1:
            G = G.reshape(c, O, Kg)
        if not from_patches:
            torch.matmul(G, v1, out=out["Gv"][start : start + c])
            torch.matmul(G.mT, u1, out=out["Gtu"][start : start + c])
        if "sum_g" in out:
            out["sum_g"] += G.sum(0)
        out["sum_sq"] += G.square_().sum(0)
        del G
    if from_patches:
        xv = torch.matmul(Xt.mT, v1)  # (c·g, P)
        Gv = torch.bmm(Dt, xv.unsqueeze(-1)).squeeze(-1)  # (c·g, Og)
        out["Gv"][start : start + c] = Gv.reshape(c, O)
        du = (Dt.reshape(c, g, Og, P) * u1.reshape(1, g, Og, 1)).sum(2).reshape(c * g, P)
        Gtu = torch.bmm(Xt, du.unsqueeze(-1)).squeeze(-1)  # (c·g, Kg)
        out["Gtu"][start : start + c] = Gtu.reshape(c, g, Kg).sum(1)


def _padded(module: nn.Conv2d, x: torch.Tensor):
    """x padded as the module pads it, and the padding left for the convolution itself."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        pads = module._reversed_padding_repeated_twice
        if any(pads):
            x = F.pad(x, pads, mode=mode)
        return x, (0, 0)
    return x, module.padding


def _conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """F.unfold of x with the module's geometry: (c, in·kh·kw, P)."""
    x, padding = _padded(module, x)
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)


def per_sample_conv2d_grads(module: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients g_i = Σ_p δ_ip x_ipᵀ of a Conv2d, shape (c, out, in/groups·kh·kw).

    The c samples become the groups of one grouped convolution (c·groups groups), whose
    weight gradient is computed by the convolution backward kernel without unfolding.
    """
    c = x.shape[0]
    x, padding = _padded(module, x)
    C, O, g = module.in_channels, module.out_channels, module.groups
    kh, kw = module.kernel_size
    G = torch.ops.aten.convolution_backward(
        delta.reshape(1, c * O, *delta.shape[2:]),
        x.reshape(1, c * C, *x.shape[2:]),
        torch.empty(c * O, C // g, kh, kw, dtype=x.dtype, device=x.device),
        None, module.stride, padding, module.dilation, False, (0, 0), c * g, (False, True, False),
    )[1]
    return G.reshape(c, O, (C // g) * kh * kw)


def conv2d_projections(module: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor, u1: torch.Tensor,
                       v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g_i v1 and g_iᵀ u1 of a Conv2d by two thin convolutions, without unfolding.

    g_i v1 = Σ_p δ_ip (x_ip · v1): x_ip · v1 is the convolution of x with the filter v1;
    g_iᵀ u1 = Σ_p x_ip (δ_ip · u1): the weight gradient of a one-output-channel convolution
    (per sample and group) against the output gradient projected on u1.
    """
    c = x.shape[0]
    x, padding = _padded(module, x)
    C, O, g = module.in_channels, module.out_channels, module.groups
    kh, kw = module.kernel_size
    Og = O // g
    filt = v1.to(x.dtype).reshape(1, C // g, kh, kw).expand(g, C // g, kh, kw).contiguous()
    xv = F.conv2d(x, filt, None, module.stride, padding, module.dilation, g)  # (c, g, H', W')
    P = delta.shape[2] * delta.shape[3]
    D = delta.reshape(c, g, Og, P)
    Gv = (D * xv.reshape(c, g, 1, P)).sum(-1).reshape(c, O)
    du = (D * u1.to(delta.dtype).reshape(1, g, Og, 1)).sum(2)  # (c, g, P)
    Gtu = torch.ops.aten.convolution_backward(
        du.reshape(1, c * g, *delta.shape[2:]),
        x.reshape(1, c * C, *x.shape[2:]),
        torch.empty(c * g, C // g, kh, kw, dtype=x.dtype, device=x.device),
        None, module.stride, padding, module.dilation, False, (0, 0), c * g, (False, True, False),
    )[1]
    return Gv, Gtu.reshape(c, g, -1).sum(1)


#: Below this many output positions the per-sample gradients of a Conv2d are formed by
#: unfolding and a batched matrix product; from it on by a grouped convolution backward
#: (faster for large feature maps, much slower for small ones on CPU).
GROUPED_CONV_MIN_POSITIONS = 64


def conv2d_statistics(
    module: nn.Conv2d,
    x: torch.Tensor,
    delta: torch.Tensor,
    u1: torch.Tensor,
    v1: torch.Tensor,
    split: bool,
    chunk_bytes: int,
    with_sum_g: bool = True,
) -> LayerStatistics:
    """Statistics of a Conv2d layer from its input x (M, C, H, W) and output gradient δ (M, O, H', W').

    With the split, the per-sample gradients of one chunk of samples at a time are formed
    (by a grouped convolution backward for feature maps of at least
    :data:`GROUPED_CONV_MIN_POSITIONS` positions, else by unfold + batched matmul) and
    reduced; without it only the patch projections are computed.
    """
    M, O = delta.shape[0], delta.shape[1]
    P = delta.shape[2] * delta.shape[3]
    K = v1.shape[0] * module.groups
    Kg = v1.shape[0]
    elem = x.element_size()
    grouped = P >= GROUPED_CONV_MIN_POSITIONS
    if grouped:  # the chunk's gradients, plus room for the kernel's copies of its input and output gradient
        per_sample = elem * ((2 * O * Kg if split else 0) + 2 * x[0].numel() + 2 * delta[0].numel())
    else:
        per_sample = elem * (2 * K * P + (O * Kg if split else 0) + O * P)
    c = int(max(1, min(M, chunk_bytes // max(1, per_sample))))
    kw = dict(dtype=u1.dtype, device=u1.device)
    out = {"Gv": torch.empty(M, O, **kw), "Gtu": torch.empty(M, Kg, **kw)}
    if split:
        if with_sum_g:
            out["sum_g"] = torch.zeros(O, Kg, **kw)
        out["sum_sq"] = torch.zeros(O, Kg, **kw)
    for s in range(0, M, c):
        e = min(M, s + c)
        if grouped and not split:
            Gv, Gtu = conv2d_projections(module, x[s:e], delta[s:e], u1, v1)
            out["Gv"][s:e] = Gv
            out["Gtu"][s:e] = Gtu
            continue
        if grouped:
            G = per_sample_conv2d_grads(module, x[s:e], delta[s:e]).to(u1.dtype)
            torch.matmul(G, v1, out=out["Gv"][s:e])
            torch.matmul(G.mT, u1, out=out["Gtu"][s:e])
            if "sum_g" in out:
                out["sum_g"] += G.sum(0)
            out["sum_sq"] += G.square_().sum(0)
            del G
            continue
        Xt = _conv_patches(module, x[s:e]).to(u1.dtype)
        if Xt.shape[2] != P:
            raise EngineError(
                f"unfolded input of Conv2d has {Xt.shape[2]} positions but its output gradient has {P}; "
                "the layer's input is not the tensor passed to its forward"
            )
        Dt = delta[s:e].reshape(e - s, O, P).to(u1.dtype)
        patch_statistics(Xt, Dt, u1, v1, split, module.groups, out, s)
        del Xt
    return LayerStatistics(M, out["Gv"], out["Gtu"], out.get("sum_g"), out.get("sum_sq"))


def sequence_linear_statistics(
    x: torch.Tensor, delta: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor, split: bool, chunk_bytes: int,
    with_sum_g: bool = True,
) -> LayerStatistics:
    """Statistics of a Linear layer applied along extra axes: x (M, …, n), δ (M, …, m)."""
    M, n, m = x.shape[0], x.shape[-1], delta.shape[-1]
    X = x.reshape(M, -1, n)
    D = delta.reshape(M, -1, m)
    P = X.shape[1]
    per_sample = x.element_size() * (P * (n + m) + (m * n if split else 0))
    c = int(max(1, min(M, chunk_bytes // max(1, per_sample))))
    kw = dict(dtype=u1.dtype, device=u1.device)
    out = {"Gv": torch.empty(M, m, **kw), "Gtu": torch.empty(M, n, **kw)}
    if split:
        if with_sum_g:
            out["sum_g"] = torch.zeros(m, n, **kw)
        out["sum_sq"] = torch.zeros(m, n, **kw)
    for s in range(0, M, c):
        e = min(M, s + c)
        patch_statistics(X[s:e].mT, D[s:e].mT, u1, v1, split, 1, out, s)
    return LayerStatistics(M, out["Gv"], out["Gtu"], out.get("sum_g"), out.get("sum_sq"))


def module_statistics(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor,
                      split: bool, chunk_bytes: int, with_sum_g: bool = True) -> LayerStatistics:
    """Statistics of one use of a Linear or Conv2d ``module`` from its input x and output gradient δ.

    Dispatches to :func:`conv2d_statistics`, :func:`linear_statistics` (x of shape (M, n))
    or :func:`sequence_linear_statistics` (x of shape (M, …, n)).
    """
    if isinstance(module, nn.Conv2d):
        if x.ndim != 4:
            raise EngineError(f"Conv2d layer needs a batched 4-d input, got shape {tuple(x.shape)}")
        return conv2d_statistics(module, x, delta, u1, v1, split, chunk_bytes, with_sum_g)
    if x.ndim == 2:
        return linear_statistics(x.to(u1.dtype), delta.to(u1.dtype), u1, v1, split, with_sum_g)
    return sequence_linear_statistics(x, delta, u1, v1, split, chunk_bytes, with_sum_g)


def per_sample_weight_grads(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients g_i = Σ_p δ_ip x_ipᵀ of one use of a Linear or Conv2d, shape (c, m, n).

    Conv2d: by a grouped convolution backward for feature maps of at least
    :data:`GROUPED_CONV_MIN_POSITIONS` positions, else by unfold + batched matmul; Linear:
    a batched matmul over the positions of x (M, …, n) and δ (M, …, m).
    """
    c = x.shape[0]
    if isinstance(module, nn.Conv2d):
        P = delta.shape[2] * delta.shape[3]
        if P >= GROUPED_CONV_MIN_POSITIONS:
            return per_sample_conv2d_grads(module, x, delta)
        g, O = module.groups, delta.shape[1]
        Xt = _conv_patches(module, x)
        if Xt.shape[2] != P:
            raise EngineError(
                f"unfolded input of Conv2d has {Xt.shape[2]} positions but its output gradient has {P}; "
                "the layer's input is not the tensor passed to its forward"
            )
        Dt = delta.reshape(c, O, P)
        return torch.bmm(Dt.reshape(c * g, O // g, P), Xt.reshape(c * g, -1, P).mT).reshape(c, O, -1)
    n, m = x.shape[-1], delta.shape[-1]
    return delta.reshape(c, -1, m).mT @ x.reshape(c, -1, n)


def multi_use_statistics(
    uses, u1: torch.Tensor, v1: torch.Tensor, split: bool, chunk_bytes: int,
) -> LayerStatistics:
    """Statistics of a weight applied several times: g_i = Σ_uses δ_i,use x_i,useᵀ.

    Args:
        uses: (module, x, δ) of every use of the weight, x and δ batch-first with M samples.
        u1, v1: the top singular pair of the weight matrix.
        split: also Σ g_i and Σ g_i ∘ g_i; these need the per-sample gradients of the
            layer summed over the uses, formed a chunk of samples at a time
            (:func:`per_sample_weight_grads`). Without the split only the projections are
            computed, use by use, and added.
        chunk_bytes: memory budget of one chunk.
    """
    M = uses[0][1].shape[0]
    if not split:
        parts = [module_statistics(mod, x, d, u1, v1, False, chunk_bytes) for mod, x, d in uses]
        return LayerStatistics(M, sum(p.Gv for p in parts), sum(p.Gtu for p in parts))
    m, n = u1.shape[0], v1.shape[0]
    acc = StatisticsAccumulator(M, (m, n), u1, v1, split=True)
    elem = max(uses[0][1].element_size(), u1.element_size())
    per_sample = elem * (2 * m * n + sum(2 * (x[0].numel() + d[0].numel()) for _, x, d in uses))
    c = int(max(1, min(M, chunk_bytes // max(1, per_sample))))
    for s in range(0, M, c):
        e = min(M, s + c)
        G = None
        for mod, x, d in uses:
            g = per_sample_weight_grads(mod, x[s:e], d[s:e]).to(u1.dtype)
            G = g if G is None else G.add_(g)
        acc.add_per_sample(s, G, overwrite=True)
        del G
    return acc.result()


class FactoredEngine(Engine):
    """Per-sample statistics from forward/backward hooks, without per-sample gradients (THEORY.md §6).

    Applies to nn.Linear and nn.Conv2d layers of a model whose samples are independent
    (no BatchNorm normalising with batch statistics), called with batch-first inputs. A
    layer applied more than once (:attr:`~sdelip.layers.TrackedLayer.uses` > 1: tied
    weights, or a module called several times) has its statistics computed after the
    backward from every use (:func:`multi_use_statistics`); a layer with one use must be
    called once per forward pass.
    """

    name = "factored"

    def __init__(self, model, layers, split: bool = True, chunk_bytes: Optional[int] = None):
        super().__init__(model, layers, split, DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
        self._handles: list = []
        self._capture = False
        self._captured: set[str] = set()
        self._ctx: Optional[dict] = None
        self._stats: dict[str, LayerStatistics] = {}
        self._pending: dict[str, list] = {}  # layer name → (module, x, δ) of each use, for layers used > once
        self._modules = {layer.name: layer.module for layer in self.layers}
        # Weights used by exactly one module of the model: their .grad is this layer's Σ g_i / M.
        owners: dict[int, int] = {}
        for mod in model.modules():
            for p in mod._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        self._grad_ok = {layer.name for layer in self.layers if owners.get(id(layer.module.weight), 0) == 1}

    def check_applicable(self) -> None:
        """Also refuse a tracked weight held by a module whose uses the hooks cannot see."""
        super().check_applicable()
        hidden = untracked_weight_users(self.model, self.layers)
        if hidden:
            kinds = {name or type(mod).__name__: type(mod).__name__ for name, mod in self.model.named_modules()}
            desc = "; ".join(
                f"the weight of layer {name!r} is also held by {', '.join(f'{u!r} ({kinds[u]})' for u in users)}"
                for name, users in hidden.items())
            raise EngineNotApplicableError(
                f"{desc}: its per-sample gradient is the total derivative over every use, and the factored engine "
                "sees only the uses by nn.Linear/nn.Conv2d modules; use engine='materialised' (with loss_fn) or "
                "engine='coupled' (engine='auto' picks coupled)"
            )

    # -- hooks ------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        for layer in self.layers:
            for module in layer.modules:
                self._handles.append(module.register_forward_hook(functools.partial(self._forward_hook, layer)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def arm(self, capture: bool) -> None:
        self._capture = bool(capture)
        self._captured = set()

    def _forward_hook(self, layer: TrackedLayer, module, inputs, output) -> None:
        if not self._capture or not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad or not inputs:
            return
        x = inputs[0]
        if not isinstance(x, torch.Tensor):
            return
        self._captured.add(layer.name)
        # The hook lives as long as the graph (the caller holds the losses); the input is
        # held in a list that the hook empties, so that autograd frees it on schedule.
        output.register_hook(functools.partial(self._grad_hook, layer, module, [x.detach()]))

    def _grad_hook(self, layer: TrackedLayer, module: nn.Module, holder: list, grad: torch.Tensor):
        x = holder.pop() if holder else None
        ctx = self._ctx
        if ctx is None or x is None:  # a backward that is not the tracker's (e.g. the user's own)
            return None
        name = layer.name
        M = ctx["M"]
        if x.shape[0] != M or grad.shape[0] != M:
            raise EngineError(
                f"layer {name!r} saw a batch of {x.shape[0]} samples at step {ctx['step']}, but {M} per-sample "
                "losses were passed; the factored engine needs batch-first inputs with one loss per sample"
            )
        if isinstance(module, nn.Conv2d) and x.ndim != 4:
            raise EngineError(f"Conv2d layer {name!r} needs a batched 4-d input, got shape {tuple(x.shape)}")
        if layer.uses > 1:  # g_i sums over the uses: the statistics are computed after the backward
            self._pending.setdefault(name, []).append((module, x, grad.detach()))
            return None
        if name in self._stats:
            raise EngineError(
                f"layer {name!r} was called more than once in the forward pass of step {ctx['step']} "
                "(shared weights); the factored engine needs one call per layer and step: use "
                "engine='materialised' or engine='coupled'"
            )
        u1, v1 = ctx["directions"][name]
        with torch.no_grad():
            own = name not in ctx["sum_g_from_grad"]  # else Σ g_i = M · weight.grad, read after the backward
            stats = module_statistics(module, x, grad, u1, v1, self.split, self.chunk_bytes, own)
            stats.scale_(float(ctx["scale"]))
            stats.check_finite(name, ctx["step"])
        self._stats[name] = stats
        return None

    def _multi_use_stats(self, ctx: dict) -> None:
        """The statistics of the layers used more than once, from the uses kept by the hooks."""
        pending, self._pending = self._pending, {}
        with torch.no_grad():
            for name, uses in pending.items():
                u1, v1 = ctx["directions"][name]
                stats = multi_use_statistics(uses, u1, v1, self.split, self.chunk_bytes)
                stats.scale_(float(ctx["scale"]))
                stats.check_finite(name, ctx["step"])
                self._stats[name] = stats

    # -- step -------------------------------------------------------------------------------
    def backward(
        self,
        losses: torch.Tensor,
        directions: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        batch=None,
        step: Optional[int] = None,
    ) -> dict[str, LayerStatistics]:
        M = losses.shape[0]
        if not self._captured:
            raise EngineError(
                f"no forward pass of the tracked layers was recorded for step {step}: create the Tracker before "
                "the step's forward pass, run the forward with gradients enabled, and call tracker.backward "
                "once per forward"
            )
        self._stats = {}
        self._pending = {}
        # Σ_i g_i is M times the weight gradient the backward accumulates anyway, unless hooks
        # on the weight or sharing with another module could make the two differ.
        from_grad, before = set(), {}
        if self.split:
            for layer in self.layers:
                w = layer.module.weight
                if layer.name in self._grad_ok and not getattr(w, "_backward_hooks", None) \
                        and not getattr(w, "_post_accumulate_grad_hooks", None):
                    from_grad.add(layer.name)
                    before[layer.name] = None if w.grad is None else w.grad.detach().clone()
        # losses.mean() hands the hooks δ_i / M; the statistics are rescaled by M (THEORY.md §1).
        ctx = {"M": M, "directions": directions, "step": step, "scale": M, "sum_g_from_grad": from_grad}
        self._ctx = ctx
        try:
            losses.mean().backward()
            self._multi_use_stats(ctx)
        finally:
            self._ctx = None
            self._captured = set()
            self._pending = {}
        for name in from_grad:
            st = self._stats.get(name)
            if st is None:
                continue
            w = self._modules[name].weight
            g = w.grad.detach() if before[name] is None else w.grad.detach() - before[name]
            st.sum_g = weight_matrix(g).to(st.Gv.dtype) * M
        out = {}
        for layer in self.layers:
            st = self._stats.get(layer.name)
            if st is None:  # the layer was not called, or the loss does not depend on it: g_i = 0
                u1, v1 = directions[layer.name]
                m, n = u1.shape[0], v1.shape[0]
                z = dict(dtype=u1.dtype, device=u1.device)
                st = LayerStatistics(
                    M, torch.zeros(M, m, **z), torch.zeros(M, n, **z),
                    torch.zeros(m, n, **z) if self.split else None, torch.zeros(m, n, **z) if self.split else None,
                )
            out[layer.name] = st
        self._stats = {}
        return out
