"""The per-module fallback: exact per-sample gradients of one module alone (``torch.func``).

A weight matrix (a parameter with at least two dimensions that the optimizer trains) of a
module without a registered rule (nn.LSTM, nn.Bilinear, a custom module, a parameter of
the model itself) is tracked by this fallback when ``unsupported="fallback"`` (the
default of :func:`sdelip.rules.inventory.tracked_layers`), or refused by name with
``unsupported="error"``. Its forward hooks keep the module's call arguments and outputs;
after the tracker's backward, the per-sample gradient of sample i is

    g_i = ∇_θ ⟨f(x_i; θ), δ_i⟩,

``vmap`` over the samples of ``grad`` of the module's own ``functional_call`` — exact for
any module whose samples are independent and whose tensors carry the samples on axis 0
(verified: a module whose batch axis is not the first is refused). The per-sample
gradients are formed a chunk of samples at a time (memory ``chunk_bytes``); cost: one
extra forward and backward of that module per chunk. Random operations inside the
module (dropout in training mode) cannot be replayed per sample and are refused with the
module's name.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..core.statistics import EngineError, LayerStatistics, StatisticsAccumulator
from .base import LayerRule, Use, get_attr

__all__ = ["FallbackRule", "FALLBACK"]


class FallbackRule(LayerRule):
    """Exact per-sample gradients of one module's weight by ``torch.func`` (not registered by type)."""

    name = "fallback"
    supports_general = True

    def expand_general(self, use: Use, D: torch.Tensor, M: int) -> None:
        """Per-sample output gradients D (M, *output) of a call whose output does not carry the samples on one axis.

        g_i = ∇_θ ⟨f(x; θ), D_i⟩ with the whole call's arguments x: exact, since D_i is the
        gradient of ℓ_i alone (samples flattened together with windows, e.g. Swin's window
        attention). Only for a module with one differentiable output.
        """
        if len(use.output) != 1:
            from ..errors import BatchAxisError

            raise BatchAxisError(
                f"{type(use.module).__name__}: its outputs do not carry the M = {M} samples on one axis and it has "
                f"{len(use.output)} differentiable outputs; the per-module fallback needs the samples on one axis "
                "(or one output); use engine='coupled'"
            )
        use.delta = [D]
        use.extra = {**use.extra, "general": True}
        from .base import GENERAL_DONE

        use.batch_axis = GENERAL_DONE

    def weights(self, module: nn.Module) -> list[str]:
        return [n for n, p in module._parameters.items() if p is not None and p.ndim >= 2]

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def attach(self, module, attrs_, sink) -> list:
        def pre(mod, args, kwargs):
            if sink.capturing and torch.is_grad_enabled():
                mod.__dict__.setdefault("_sdelip_calls", []).append((args, kwargs))

        def post(mod, args, kwargs, output):
            calls = mod.__dict__.get("_sdelip_calls")
            if not calls:
                return
            call = calls.pop()
            if not calls:
                mod.__dict__.pop("_sdelip_calls", None)
            leaves, spec = tree_flatten(output)
            outs = [o for o in leaves if isinstance(o, torch.Tensor) and o.requires_grad]
            if not outs:
                return
            for attr in attrs_:
                sink.report(Use(self, mod, attr, call, tuple(outs),
                                extra={"spec": spec, "leaves": [isinstance(o, torch.Tensor) and o.requires_grad
                                                                for o in leaves]}))

        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(post, with_kwargs=True, always_call=True)]

    def batch_axes(self, use: Use, M: int) -> list[int]:
        out = use.output[0]
        return [a for a in range(out.ndim) if out.shape[a] == M]

    def batch_first(self, use: Use):
        if use.batch_axis is not None and use.batch_axis != 0:
            raise EngineError(
                f"the per-module fallback needs the samples on axis 0 of {type(use.module).__name__}'s outputs, but "
                f"they are on axis {use.batch_axis} (e.g. a sequence-first input); use batch_first=True or "
                "engine='materialised'"
            )
        return use.x, use.delta

    def sample_axes(self, use: Use, flat_args: list, M: int) -> tuple[list, list]:
        """The axis carrying the samples of every flattened call argument (None: shared) and of every output.

        Default: axis 0 of every tensor argument whose leading size is M, and of every output.
        """
        args = [0 if isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == M else None for a in flat_args]
        return args, [0] * len(use.output)

    def per_sample_grads(self, use: Use, start: int, stop: int) -> torch.Tensor:
        (args, kwargs), deltas = use.x, use.delta
        module, attr = use.module, use.attr
        W = get_attr(module, attr).detach()
        flat, spec = tree_flatten((args, kwargs))
        if use.extra.get("general"):  # the whole call against each sample's output gradient
            arg_axes, out_axes = [None] * len(flat), [0]
            ds = [deltas[0][start:stop]]
            mask = use.extra["leaves"]

            def whole(w, d_i):
                a, kw = tree_unflatten(flat, spec)
                out = functional_call(module, {attr: w}, tuple(a), kw, strict=False)
                leaves = [o for o, keep in zip(tree_flatten(out)[0], mask) if keep]
                return (leaves[0] * d_i).sum()

            g = self._vmap(whole, (None, 0), module)(W, ds[0])
            return g.reshape(g.shape[0], g.shape[1], -1)
        arg_axes, out_axes = self.sample_axes(use, flat, _samples(use))
        idx = torch.arange(start, stop, device=W.device)
        sliced = [a.index_select(ax, idx) if ax is not None else a for a, ax in zip(flat, arg_axes)]
        ds = [torch.zeros_like(o.index_select(ax, idx)) if d is None else d.index_select(ax, idx)
              for o, d, ax in zip(use.output, deltas, out_axes)]
        mask = use.extra["leaves"]

        def inner(w, xs, d_i):
            full = [x.unsqueeze(ax) if ax is not None else x for x, ax in zip(xs, arg_axes)]
            a, kw = tree_unflatten(full, spec)
            out = functional_call(module, {attr: w}, tuple(a), kw, strict=False)
            leaves = [o for o, keep in zip(tree_flatten(out)[0], mask) if keep]
            return sum((o * d.unsqueeze(ax)).sum() for o, d, ax in zip(leaves, d_i, out_axes))

        g = self._vmap(inner, (None, list(arg_axes), list(out_axes)), module)(W, sliced, ds)
        return g.reshape(g.shape[0], g.shape[1], -1)

    @staticmethod
    def _vmap(fn, in_dims, module):
        def run(*args):
            try:
                return vmap(grad(fn), in_dims=in_dims, randomness="error")(*args)
            except RuntimeError as err:
                if "random" in str(err).lower():
                    raise EngineError(
                        f"{type(module).__name__} module draws random numbers in its forward (dropout in training "
                        "mode): the per-module fallback cannot replay them per sample; put the module in eval mode, "
                        "or use engine='coupled'"
                    ) from err
                raise
        return run

    def statistics(self, use: Use, u1, v1, split, chunk_bytes, with_sum_g=True) -> LayerStatistics:
        M = _samples(use)
        m, n = u1.shape[0], v1.shape[0]
        acc = StatisticsAccumulator(M, (m, n), u1, v1, split)
        c = int(max(1, min(M, chunk_bytes // max(1, 2 * m * n * u1.element_size()))))
        for s in range(0, M, c):
            acc.add_per_sample(s, self.per_sample_grads(use, s, min(M, s + c)), overwrite=True)
        return acc.result()


def _samples(use: Use) -> int:
    """M: the size of the first output's sample axis."""
    if use.extra and use.extra.get("general"):
        return use.delta[0].shape[0]
    ax = use.batch_axis if use.batch_axis is not None and use.batch_axis >= 0 else 0
    return use.output[0].shape[ax]


FALLBACK = FallbackRule()
