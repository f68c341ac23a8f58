"""Probes of how loose the product bound K is (Prop 8, Prop 9).

K = Π_ℓ σ1(θ^(ℓ)) uses, for a Conv2d, the operator norm of its reshaped kernel
(out, in·kh·kw) — the paper's Prop 9 convention. Two probes measure the real thing:

- :func:`conv_operator_norm`: the exact operator norm of a Conv2d as a linear map on its
  actual input shape (C, H, W), by power iteration with ``conv2d`` and its adjoint
  ``conv_transpose2d`` (autograd for non-zero padding modes). It can be larger or
  smaller than σ1 of the reshaped kernel (up to √(kh·kw / stride²)-ish factors).
- :func:`lipschitz_lower_bound`: max over a probe batch of the spectral norm of the
  input-Jacobian ‖∂f/∂x (x_i)‖₂, by power iteration with forward- and reverse-mode
  products. Every value is a certified lower bound of the network's Lipschitz constant
  (‖J v‖ ≤ ‖J‖ ≤ Lip(f) for unit v), so K / lipschitz_lower bounds the looseness of K.

Both use their own generator (never the global RNG) and leave ``p.grad`` untouched.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_operator_norm", "lipschitz_lower_bound", "ConvNormResult"]


class ConvNormResult(tuple):
    """(norm, vector, iterations): the estimate, the final right singular vector, iterations used."""

    __slots__ = ()

    def __new__(cls, norm: float, vector: torch.Tensor, iterations: int):
        return super().__new__(cls, (norm, vector, iterations))

    @property
    def norm(self) -> float:
        return self[0]

    @property
    def vector(self) -> torch.Tensor:
        return self[1]

    @property
    def iterations(self) -> int:
        return self[2]


def _conv_maps(conv: nn.Conv2d, input_shape: Sequence[int]):
    W = conv.weight.detach()
    shape = (1, *tuple(int(s) for s in input_shape))
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    zeros = conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def A(x):
        if zeros:
            return F.conv2d(x, W, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return conv._conv_forward(x, W, None)

    y_shape = A(torch.zeros(shape, dtype=W.dtype, device=W.device)).shape
    if zeros:
        H, Wd = shape[2], shape[3]
        op = []
        for dim, size in ((0, H), (1, Wd)):
            k, s, p, d = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim], conv.dilation[dim]
            base = (y_shape[2 + dim] - 1) * s - 2 * p + d * (k - 1) + 1
            op.append(size - base)

        def At(y):
            return F.conv_transpose2d(y, W, None, conv.stride, conv.padding, tuple(op), conv.groups, conv.dilation)
    else:

        def At(y):
            x = torch.zeros(shape, dtype=W.dtype, device=W.device, requires_grad=True)
            with torch.enable_grad():
                out = A(x)
                (g,) = torch.autograd.grad(out, x, y)
            return g

    return A, At, shape


def conv_operator_norm(
    conv: nn.Conv2d,
    input_shape: Sequence[int],
    n_iter: int = 200,
    tol: float = 1e-6,
    init: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> ConvNormResult:
    """Operator norm of a Conv2d (without bias) on inputs of shape ``input_shape`` = (C, H, W).

    Power iteration on AᵀA (A = conv2d, Aᵀ = conv_transpose2d with the output padding that
    restores H × W). The estimate ‖A v‖ for unit v increases to σ_max(A); iteration stops
    when it changes by less than ``tol`` (relative) or after ``n_iter`` iterations.

    Args:
        conv: the layer.
        input_shape: (C, H, W) of its input.
        n_iter: maximum number of iterations.
        tol: relative tolerance on the estimate.
        init: starting vector (e.g. the previous result's vector, for a warm start).
        generator: generator for the random starting vector.

    Returns:
        :class:`ConvNormResult` (norm, vector, iterations).
    """
    A, At, shape = _conv_maps(conv, input_shape)
    W = conv.weight
    with torch.no_grad():
        if init is not None and tuple(init.shape) == shape:
            v = init.to(dtype=W.dtype, device=W.device).clone()
        else:
            v = torch.randn(shape, generator=generator, dtype=W.dtype, device="cpu").to(W.device)
        v /= v.norm().clamp_min(torch.finfo(v.dtype).tiny)
        est, it = 0.0, 0
        for it in range(1, n_iter + 1):
            y = A(v)
            new = float(y.norm())
            w = At(y)
            nw = w.norm()
            if float(nw) == 0.0:
                return ConvNormResult(0.0, v, it)
            v = w / nw
            if abs(new - est) <= tol * max(new, 1e-300):
                est = new
                break
            est = new
    return ConvNormResult(est, v, it)


def lipschitz_lower_bound(
    model: nn.Module,
    inputs: torch.Tensor,
    n_iter: int = 20,
    tol: float = 1e-4,
    generator: Optional[torch.Generator] = None,
    per_sample: bool = False,
):
    """Largest input-Jacobian spectral norm over a probe batch: a lower bound of Lip(f).

    Runs the model in eval mode (restored afterwards); the samples must be independent
    in eval mode (BatchNorm with running statistics is fine). Power iteration per sample:
    v ← Jᵀ J v / ‖Jᵀ J v‖ with J v from forward-mode and Jᵀ u from reverse-mode AD.

    Args:
        model: the network f.
        inputs: (N, …) probe inputs.
        n_iter: maximum power iterations.
        tol: relative tolerance on the largest estimate.
        generator: generator for the random starting vectors.
        per_sample: also return the per-sample estimates.

    Returns:
        The maximum over the batch of ‖J_i v_i‖ (a float), or (max, per-sample tensor).
    """
    from torch.func import jvp, vjp

    if inputs.ndim < 2:
        raise ValueError(f"probe inputs must be a batch (N, ...), got shape {tuple(inputs.shape)}")
    was_training = model.training
    model.eval()
    try:
        x = inputs.detach()
        N = x.shape[0]
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)

        def normalise(t):
            n = t.reshape(N, -1).norm(dim=1).clamp_min(torch.finfo(t.dtype).tiny)
            return t / n.reshape(N, *([1] * (t.ndim - 1)))

        v = normalise(v)
        f = lambda z: model(z)  # noqa: E731
        with torch.no_grad():
            _, pullback = vjp(f, x)
            best = 0.0
            est = torch.zeros(N, dtype=x.dtype, device=x.device)
            for _ in range(n_iter):
                _, Jv = jvp(f, (x,), (v,))
                est = Jv.reshape(N, -1).norm(dim=1)
                (w,) = pullback(Jv)
                v = normalise(w)
                new = float(est.max())
                if abs(new - best) <= tol * max(new, 1e-300):
                    best = new
                    break
                best = new
    finally:
        model.train(was_training)
    return (best, est) if per_sample else best
