"""nn.Conv1d / Conv2d / Conv3d: g_i = Σ_p δ_ip x_ipᵀ over the output positions p (docs/theory.md §8).

θ is the reshaped kernel (out, in/groups·prod(kernel)) whose rows are the filters; x_ip is
the input patch seen by output position p and δ_ip the output gradient there. Stride,
dilation, padding (numbers, ``"same"``/``"valid"``, any padding mode) and groups
(depthwise included) are supported.

A Conv1d is computed as a Conv2d of height 1 (kernel (1, k)): the same patches, the same
numbers. Conv2d forms patches by ``F.unfold`` for small feature maps and per-sample
gradients by a grouped convolution backward (the samples become the groups) for feature
maps of at least :data:`GROUPED_CONV_MIN_POSITIONS` positions; Conv3d always by the
grouped convolution backward (``F.unfold`` is 2-d only). Without the Prop 6 split the
projections g_i v1, g_iᵀ u1 come from two thin convolutions, without per-sample gradients.
The input of a convolution always carries the samples on axis 0.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ..core.statistics import EngineError, LayerStatistics
from .base import LayerRule, Use, register_rule
from .linear import patch_scaled_projections, patch_statistics, statistics_buffers

__all__ = ["ConvRule", "ConvGeometry", "conv_statistics", "per_sample_conv_grads", "conv_projections",
           "conv_scaled_projections", "GROUPED_CONV_MIN_POSITIONS"]

#: The Prop 6 split of a small 2-d map (fewer positions P than :data:`GROUPED_CONV_MIN_POSITIONS`,
#: one group) sums g_i ∘ g_i without forming g_i when P(P+1)/2 is at most this: by the pairs of
#: positions p ≤ q, Σ_i g_i∘g_i = Σ_{i, p≤q} w_pq (δ_ip∘δ_iq)(x_ip∘x_iq)ᵀ (w = 1 on the diagonal, 2 off
#: it), one matrix product with inner dimension M·P(P+1)/2 instead of M per-sample O × K gradients
#: written, squared and summed (memory-bound; resnet18's 1 × 1 and 2 × 2 maps; docs/performance.md).
PAIR_MAX_PAIRS = 10

#: Below this many output positions the per-sample gradients of a Conv2d are formed by
#: unfolding and a batched matrix product; from it on by a grouped convolution backward
#: (faster for large feature maps, much slower for small ones on CPU).
GROUPED_CONV_MIN_POSITIONS = 64

_CONV = {2: F.conv2d, 3: F.conv3d}


@attrs.frozen
class ConvGeometry:
    """A convolution's geometry as 2-d or 3-d (a Conv1d is lifted to height 1).

    Attributes:
        spatial: number of spatial axes after lifting (2 or 3).
        lifted: the module is a Conv1d computed as a Conv2d of height 1.
        in_channels, out_channels, groups: as the module's.
        kernel_size, stride, dilation, padding: per lifted spatial axis; padding is what
            is left for the convolution after :meth:`prepare` padded explicitly.
        pre_pad: ``F.pad`` spec applied to the input first (string padding, non-zero padding
            modes), or None.
        pad_mode: the ``F.pad`` mode of ``pre_pad``.
    """

    spatial: int
    lifted: bool
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple
    stride: tuple
    dilation: tuple
    padding: tuple
    pre_pad: Optional[tuple]
    pad_mode: str

    @classmethod
    def of(cls, module: nn.modules.conv._ConvNd) -> "ConvGeometry":
        nd = len(module.kernel_size)
        explicit = isinstance(module.padding, str) or module.padding_mode != "zeros"
        pads = tuple(module._reversed_padding_repeated_twice)
        pre_pad = pads if explicit and any(pads) else None
        padding = (0,) * nd if explicit else tuple(module.padding)
        lift = (lambda t, one: (one, *t)) if nd == 1 else (lambda t, one: tuple(t))
        return cls(
            spatial=max(nd, 2), lifted=nd == 1, in_channels=module.in_channels, out_channels=module.out_channels,
            groups=module.groups, kernel_size=lift(module.kernel_size, 1), stride=lift(module.stride, 1),
            dilation=lift(module.dilation, 1), padding=lift(padding, 0), pre_pad=pre_pad,
            pad_mode="constant" if module.padding_mode == "zeros" else module.padding_mode,
        )

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the convolution sees it: explicitly padded, lifted to 2-d for a Conv1d."""
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        return x.unsqueeze(2) if self.lifted else x

    def lift_delta(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.unsqueeze(2) if self.lifted else delta

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)


def _patches(geo: ConvGeometry, x: torch.Tensor, positions: int) -> torch.Tensor:
    """F.unfold of a prepared 2-d input: (c, in·kh·kw, P), checked against the P positions of the output gradient.

    Raises:
        EngineError: the unfolded input has another number of positions (the layer's input is
            not the tensor passed to its forward).
    """
    Xt = F.unfold(x, geo.kernel_size, dilation=geo.dilation, padding=geo.padding, stride=geo.stride)
    if Xt.shape[2] != positions:
        raise EngineError(
            f"unfolded input of the convolution has {Xt.shape[2]} positions but its output gradient has {positions}; "
            "the layer's input is not the tensor passed to its forward"
        )
    return Xt


def per_sample_conv_grads(geo: ConvGeometry, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients of prepared x (c, C, …) and lifted δ (c, O, …): (c, O, C/groups·prod(k)).

    The c samples become the groups of one grouped convolution (c·groups groups), whose
    weight gradient the convolution backward kernel computes without unfolding.
    """
    c, O, Kg = x.shape[0], geo.out_channels, (geo.in_channels // geo.groups) * geo.kernel_numel
    return _sample_grouped_weight_grad(geo, x, delta).reshape(c, O, Kg)


def _sample_grouped_weight_grad(geo: ConvGeometry, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The weight gradient of the convolution whose groups are the c samples times the module's groups.

    x (c, C, …) prepared, grad_out (c, K, …) against K output channels per sample (K a
    multiple of the groups): (c·K, C/groups, *kernel), by the convolution backward kernel.
    """
    c, K = grad_out.shape[0], grad_out.shape[1]
    C, g = geo.in_channels, geo.groups
    return torch.ops.aten.convolution_backward(
        grad_out.reshape(1, c * K, *grad_out.shape[2:]),
        x.reshape(1, c * C, *x.shape[2:]),
        torch.empty(c * K, C // g, *geo.kernel_size, dtype=x.dtype, device=x.device),
        None, geo.stride, geo.padding, geo.dilation, False, (0,) * geo.spatial, c * g, (False, True, False),
    )[1]


def conv_projections(geo: ConvGeometry, x: torch.Tensor, delta: torch.Tensor, u1: torch.Tensor,
                     v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g_i v1 and g_iᵀ u1 by two thin convolutions, without unfolding (prepared x, lifted δ).

    g_i v1 = Σ_p δ_ip (x_ip · v1): x_ip · v1 is the convolution of x with the filter v1;
    g_iᵀ u1 = Σ_p x_ip (δ_ip · u1): the weight gradient of a one-output-channel convolution
    (per sample and group) against the output gradient projected on u1.
    """
    c = x.shape[0]
    C, O, g = geo.in_channels, geo.out_channels, geo.groups
    Og = O // g
    filt = v1.to(x.dtype).reshape(1, C // g, *geo.kernel_size).expand(g, C // g, *geo.kernel_size).contiguous()
    xv = _CONV[geo.spatial](x, filt, None, geo.stride, geo.padding, geo.dilation, g)  # (c, g, …)
    P = math.prod(delta.shape[2:])
    D = delta.reshape(c, g, Og, P)
    Gv = (D * xv.reshape(c, g, 1, P)).sum(-1).reshape(c, O)
    du = (D * u1.to(delta.dtype).reshape(1, g, Og, 1)).sum(2)  # (c, g, P)
    Gtu = _sample_grouped_weight_grad(geo, x, du.reshape(c, g, *delta.shape[2:]))
    return Gv, Gtu.reshape(c, g, -1).sum(1)


def conv_statistics(
    geo: ConvGeometry,
    x: torch.Tensor,
    delta: torch.Tensor,
    u1: torch.Tensor,
    v1: torch.Tensor,
    split: bool,
    chunk_bytes: int,
    with_sum_g: bool = True,
) -> LayerStatistics:
    """Statistics of a convolution from its input x (M, C, …) and output gradient δ (M, O, …).

    With the split, the per-sample gradients of one chunk of samples at a time are formed
    (grouped convolution backward, or unfold + batched matmul for small 2-d maps) and
    reduced; without it only the projections are computed.
    """
    x = geo.prepare(x)
    delta = geo.lift_delta(delta)
    M, O = delta.shape[0], delta.shape[1]
    P = math.prod(delta.shape[2:])
    Kg = v1.shape[0]
    K = Kg * geo.groups
    elem = x.element_size()
    grouped = geo.spatial != 2 or P >= GROUPED_CONV_MIN_POSITIONS
    if grouped:  # the chunk's gradients, plus room for the kernel's copies of its input and output gradient
        per_sample = elem * ((2 * O * Kg if split else 0) + 2 * x[0].numel() + 2 * delta[0].numel())
    else:
        per_sample = elem * (2 * K * P + (O * Kg if split else 0) + O * P)
    c = int(max(1, min(M, chunk_bytes // max(1, per_sample))))
    out = statistics_buffers(M, O, Kg, split, with_sum_g, u1)
    if split and not grouped and geo.groups == 1 and P * (P + 1) // 2 <= PAIR_MAX_PAIRS:
        _pair_statistics(geo, x, delta, u1, v1, chunk_bytes, out)
        return LayerStatistics(M, out["Gv"], out["Gtu"], out.get("sum_g"), out.get("sum_sq"))
    for s in range(0, M, c):
        e = min(M, s + c)
        if grouped and not split:
            Gv, Gtu = conv_projections(geo, x[s:e], delta[s:e], u1, v1)
            out["Gv"][s:e] = Gv
            out["Gtu"][s:e] = Gtu
            continue
        if grouped:
            G = per_sample_conv_grads(geo, x[s:e], delta[s:e]).to(u1.dtype)
            torch.matmul(G, v1, out=out["Gv"][s:e])
            torch.matmul(G.mT, u1, out=out["Gtu"][s:e])
            if "sum_g" in out:
                out["sum_g"] += G.sum(0)
            out["sum_sq"] += G.square_().sum(0)
            del G
            continue
        Xt = _patches(geo, x[s:e], P).to(u1.dtype)
        Dt = delta[s:e].reshape(e - s, O, P).to(u1.dtype)
        patch_statistics(Xt, Dt, u1, v1, split, geo.groups, out, s)
        del Xt
    return LayerStatistics(M, out["Gv"], out["Gtu"], out.get("sum_g"), out.get("sum_sq"))


def _pair_statistics(geo: ConvGeometry, x: torch.Tensor, delta: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor,
                     chunk_bytes: int, out: dict) -> None:
    """The statistics of a one-group convolution on a small map without per-sample gradients (:data:`PAIR_MAX_PAIRS`).

    Fills ``out`` (:func:`~sdelip.rules.linear.statistics_buffers`) for prepared x (M, C, …)
    and lifted δ (M, O, …): g_i v1 = Σ_p δ_ip (x_ip · v1), g_iᵀ u1 = Σ_p x_ip (δ_ip · u1)
    from the patches, Σ g_i = Σ_{i,p} δ_ip x_ipᵀ and Σ g_i∘g_i by the pairs of positions, each
    one matrix product over a chunk of samples.
    """
    M, O = delta.shape[0], delta.shape[1]
    P = math.prod(delta.shape[2:])
    K = v1.shape[0]
    iu = torch.triu_indices(P, P, device=delta.device)
    pi, qi = iu[0], iu[1]
    npairs = pi.shape[0]
    w = torch.where(pi == qi, 1.0, 2.0).to(device=delta.device, dtype=u1.dtype)
    per_sample = x.element_size() * (2 * K * P + O * P + (K + O) * npairs)
    c = int(max(1, min(M, chunk_bytes // max(1, per_sample))))
    for s in range(0, M, c):
        e = min(M, s + c)
        Xt = _patches(geo, x[s:e], P).to(u1.dtype)  # (c, K, P)
        Dt = delta[s:e].reshape(e - s, O, P).to(u1.dtype)
        out["Gv"][s:e] = torch.bmm(Dt, torch.matmul(Xt.mT, v1).unsqueeze(-1)).squeeze(-1)
        out["Gtu"][s:e] = torch.bmm(Xt, torch.matmul(u1, Dt).unsqueeze(-1)).squeeze(-1)
        if "sum_g" in out:  # (O, c·P) @ (c·P, K)
            out["sum_g"].addmm_(Dt.permute(1, 0, 2).reshape(O, -1), Xt.permute(0, 2, 1).reshape(-1, K))
        # positions first, so that the pairs gather whole rows: (c, npairs, O) and (c, npairs, K)
        Dp, Xp = Dt.permute(0, 2, 1).contiguous(), Xt.permute(0, 2, 1).contiguous()
        A = (Dp[:, pi] * Dp[:, qi]).mul_(w[:, None])
        B = Xp[:, pi] * Xp[:, qi]
        out["sum_sq"].addmm_(A.reshape(-1, O).mT, B.reshape(-1, K))
        del Xt, Xp, A, B


def conv_scaled_projections(geo: ConvGeometry, x: torch.Tensor, delta: torch.Tensor, S: torch.Tensor,
                            u1: torch.Tensor, v1: torch.Tensor, chunk_bytes: int,
                            route: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S ∘ g_i) v1 (M, O) and (S ∘ g_i)ᵀ u1 (M, Kg) of a convolution, g_i = Σ_p δ_ip x_ipᵀ.

    S (O, Kg) is elementwise on the reshaped kernel. A chunk of samples at a time
    (``chunk_bytes``), by the same routes as :func:`conv_statistics`: for small 2-d maps from
    the unfolded patches (:func:`~sdelip.rules.linear.patch_scaled_projections`: Σ_p δ_ip ∘
    (S_j (x_ip ∘ v1)), or the chunk's g_i by one bmm when P ≥ 3, which costs half as much),
    else from the chunk's per-sample gradients by the grouped convolution backward, S ∘ g_i,
    then the two projections. ``route`` forces the patch route (tests).
    """
    x = geo.prepare(x)
    delta = geo.lift_delta(delta)
    M, O = delta.shape[0], delta.shape[1]
    P = math.prod(delta.shape[2:])
    Kg = v1.shape[0]
    K = Kg * geo.groups
    elem = x.element_size()
    grouped = geo.spatial != 2 or P >= GROUPED_CONV_MIN_POSITIONS
    if grouped:
        per_sample = elem * (3 * O * Kg + 2 * x[0].numel() + 2 * delta[0].numel())
    else:
        per_sample = elem * (2 * K * P + 2 * max(O * Kg, (O + K) * P) + O * P)
    c = int(max(1, min(M, chunk_bytes // max(1, per_sample))))
    Gv = torch.empty(M, O, dtype=u1.dtype, device=u1.device)
    Gtu = torch.empty(M, Kg, dtype=u1.dtype, device=u1.device)
    for s in range(0, M, c):
        e = min(M, s + c)
        if grouped:
            SG = per_sample_conv_grads(geo, x[s:e], delta[s:e]).to(u1.dtype).mul_(S)
            torch.matmul(SG, v1, out=Gv[s:e])
            torch.matmul(SG.mT, u1, out=Gtu[s:e])
            del SG
            continue
        Xt = _patches(geo, x[s:e], P).to(u1.dtype)
        Dt = delta[s:e].reshape(e - s, O, P).to(u1.dtype)
        Gv[s:e], Gtu[s:e] = patch_scaled_projections(Xt, Dt, S, u1, v1, geo.groups, route)
        del Xt
    return Gv, Gtu


def conv_per_sample_grads(geo: ConvGeometry, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients (c, O, C/groups·prod(k)) of a chunk: unfold for small 2-d maps, else grouped."""
    x = geo.prepare(x)
    delta = geo.lift_delta(delta)
    c, O = delta.shape[0], delta.shape[1]
    P = math.prod(delta.shape[2:])
    if geo.spatial != 2 or P >= GROUPED_CONV_MIN_POSITIONS:
        return per_sample_conv_grads(geo, x, delta)
    g = geo.groups
    Xt = _patches(geo, x, P)
    Dt = delta.reshape(c, O, P)
    return torch.bmm(Dt.reshape(c * g, O // g, P), Xt.reshape(c * g, -1, P).mT).reshape(c, O, -1)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    """nn.Conv1d/2d/3d; θ is the (out, in/groups·prod(kernel)) reshaped kernel (Prop 9)."""

    name = "conv"
    sde_factored = True
    supports_general = False

    def check_module(self, module, path):
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # pragma: no cover - not registered
            raise ValueError(f"{path!r}: transposed convolutions have no rule")

    def has_operator_norm_probe(self, module) -> bool:
        return isinstance(module, nn.Conv2d)

    def operator_norm_probe(self, module, input_shape, init=None, generator=None):
        from ..tracking.probes import conv_operator_norm

        if not self.has_operator_norm_probe(module) or len(input_shape) != 3:
            return None
        return conv_operator_norm(module, input_shape, init=init, generator=generator)

    def batch_axes(self, use: Use, M: int) -> list[int]:
        nd = len(use.module.kernel_size)
        if use.x.ndim != nd + 2:
            raise EngineError(
                f"{type(use.module).__name__} layer needs a batched {nd + 2}-d input (N, C, …), got shape "
                f"{tuple(use.x.shape)}"
            )
        return [0] if use.x.shape[0] == M else []

    def statistics(self, use: Use, u1, v1, split, chunk_bytes, with_sum_g=True) -> LayerStatistics:
        return conv_statistics(ConvGeometry.of(use.module), use.x, use.delta, u1, v1, split, chunk_bytes, with_sum_g)

    def per_sample_grads(self, use: Use, start: int, stop: int) -> torch.Tensor:
        return conv_per_sample_grads(ConvGeometry.of(use.module), use.x[start:stop], use.delta[start:stop])

    def scaled_projections(self, use: Use, S, u1, v1, M, chunk_bytes):
        return conv_scaled_projections(ConvGeometry.of(use.module), use.x, use.delta, S, u1, v1, chunk_bytes)
