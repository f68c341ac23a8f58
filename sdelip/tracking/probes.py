"""Probes of how loose the product bound K is (Prop 8, Prop 9).

K = Π_ℓ σ1(θ^(ℓ)) uses, for a Conv2d, the operator norm of its reshaped kernel
(out, in·kh·kw) — the paper's Prop 9 convention. Two probes measure the real thing:

- :func:`conv_operator_norm`: the exact operator norm of a Conv2d as a linear map on its
  actual input shape (C, H, W), by power iteration with ``conv2d`` and its adjoint
  ``conv_transpose2d`` (autograd for non-zero padding modes). It can be larger or
  smaller than σ1 of the reshaped kernel (up to √(kh·kw / stride²)-ish factors).
- :func:`lipschitz_lower_bound`: max over a probe batch of the spectral norm of the
  input-Jacobian ‖∂f/∂x (x_i)‖₂ — exact Jacobians for classifiers (one backward per
  output), power iteration otherwise. Every value is a lower bound of the network's
  Lipschitz constant (‖J v‖ ≤ ‖J‖ ≤ Lip(f)), so K / lipschitz_lower bounds how loose
  the product bound K is.

Both use their own generator (never the global RNG) and leave ``p.grad`` untouched.
"""

from __future__ import annotations

import math
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
            x = torch.zeros((y.shape[0], *shape[1:]), dtype=W.dtype, device=W.device, requires_grad=True)
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
    block: int = 8,
) -> ConvNormResult:
    """Operator norm of a Conv2d (without bias) on inputs of shape ``input_shape`` = (C, H, W).

    Block power iteration on AᵀA (A = conv2d, Aᵀ = conv_transpose2d with the output
    padding that restores H × W) with a Rayleigh–Ritz step on a block of ``block``
    vectors: the top Ritz value √λ_max(VᵀAᵀAV) is a lower bound that increases to
    σ_max(A), converging like (σ_{block+1}/σ1)^{2k} — a block handles the repeated top singular
    values that symmetric (e.g. circular) convolutions have. Iteration stops when it changes by
    less than ``tol`` (relative) or after ``n_iter`` iterations.

    Args:
        conv: the layer.
        input_shape: (C, H, W) of its input.
        n_iter: maximum number of iterations.
        tol: relative tolerance on the estimate.
        init: starting vector(s), shape (C, H, W) or (b, C, H, W) (e.g. the previous
            result's vector, for a warm start).
        generator: generator for the random starting block.
        block: block size b ≥ 1.

    Returns:
        :class:`ConvNormResult` (norm, top right singular vector (C, H, W), iterations).
    """
    A, At, shape = _conv_maps(conv, input_shape)
    W = conv.weight
    dt, dev = W.dtype, W.device
    d = math.prod(shape[1:])
    b = int(max(1, min(block, d)))
    with torch.no_grad():
        V = torch.randn((b, *shape[1:]), generator=generator, dtype=dt, device="cpu").to(dev)
        if init is not None:
            init = init.to(dtype=dt, device=dev).reshape(-1, *shape[1:])
            k = min(b, init.shape[0])
            V[:k] = init[:k]
        Q, _ = torch.linalg.qr(V.reshape(b, d).mT)
        V = Q.mT.reshape(b, *shape[1:])
        est, it = 0.0, 0
        for it in range(1, n_iter + 1):
            Y = A(V)
            Yf = Y.reshape(b, -1)
            evals, evecs = torch.linalg.eigh(Yf @ Yf.mT)  # Rayleigh–Ritz: VᵀAᵀAV, V orthonormal
            new = float(evals[-1].clamp_min(0).sqrt())
            Wn = At(Y).reshape(b, d)
            Wn = evecs.flip(-1).mT @ Wn  # rotate: row 0 along the top Ritz vector
            Q, R = torch.linalg.qr(Wn.mT)
            if float(R.diagonal().abs().max()) == 0.0:
                return ConvNormResult(0.0, V[0], it)
            sign = torch.sign(R.diagonal())
            sign[sign == 0] = 1
            V = (Q * sign).mT.reshape(b, *shape[1:])
            if abs(new - est) <= tol * max(new, 1e-300):
                est = new
                break
            est = new
    return ConvNormResult(est, V[0].clone(), it)


def lipschitz_lower_bound(
    model: nn.Module,
    inputs: torch.Tensor,
    n_iter: int = 30,
    tol: float = 1e-5,
    generator: Optional[torch.Generator] = None,
    per_sample: bool = False,
    max_exact_outputs: int = 64,
):
    """Largest input-Jacobian spectral norm over a probe batch: a lower bound of Lip(f).

    Runs the model in eval mode (restored afterwards); the samples must be independent
    in eval mode (BatchNorm with running statistics is fine). For models with at most
    ``max_exact_outputs`` outputs per sample (classifiers) the per-sample Jacobians are
    formed exactly from one backward pass per output and their spectral norms computed
    directly; otherwise power iteration on JᵀJ with vector-Jacobian products and
    Jacobian-vector products (double backward), whose estimates ‖J v‖, ‖v‖ = 1, are
    lower bounds too. ``p.grad`` is not touched.

    Args:
        model: the network f.
        inputs: (N, …) probe inputs.
        n_iter: maximum power iterations (large outputs only).
        tol: relative tolerance of the power iteration.
        generator: generator for the random starting vectors.
        per_sample: also return the per-sample values.
        max_exact_outputs: output size up to which the Jacobian is formed exactly.

    Returns:
        The maximum over the batch of ‖J_f(x_i)‖₂ (a float), or (max, per-sample tensor).
    """
    if inputs.ndim < 2:
        raise ValueError(f"probe inputs must be a batch (N, ...), got shape {tuple(inputs.shape)}")
    was_training = model.training
    model.eval()
    try:
        x = inputs.detach().clone().requires_grad_(True)
        N = x.shape[0]
        with torch.enable_grad():
            out = model(x)
            flat = out.reshape(N, -1)
            C = flat.shape[1]
            if C <= max_exact_outputs:
                rows = []
                for c in range(C):
                    (g,) = torch.autograd.grad(flat[:, c].sum(), x, retain_graph=c < C - 1)
                    rows.append(g.reshape(N, -1))
                J = torch.stack(rows, 1)  # (N, C, d): independent samples → row blocks of each J_i
                est = torch.linalg.matrix_norm(J, ord=2).detach()
            else:
                v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)

                def normalise(t):
                    n = t.reshape(N, -1).norm(dim=1).clamp_min(torch.finfo(t.dtype).tiny)
                    return t / n.reshape(N, *([1] * (t.ndim - 1)))

                v = normalise(v)
                u = torch.zeros_like(out, requires_grad=True)
                (Jt_u,) = torch.autograd.grad(out, x, u, create_graph=True)  # linear in u
                best = 0.0
                for it in range(n_iter):
                    (Jv,) = torch.autograd.grad(Jt_u, u, v, retain_graph=True)  # J v by double backward
                    est = Jv.reshape(N, -1).norm(dim=1).detach()
                    (w,) = torch.autograd.grad(out, x, Jv, retain_graph=True)
                    v = normalise(w.detach())
                    new = float(est.max())
                    if abs(new - best) <= tol * max(new, 1e-300):
                        break
                    best = new
    finally:
        model.train(was_training)
    best = float(est.max())
    return (best, est) if per_sample else best
