"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): their weights applied at every time step.

Each weight matrix (``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}[_reverse]``,
``weight_hr_l{k}`` with ``proj_size``) is tracked exactly by the per-module fallback
(:mod:`sdelip.rules.fallback`: ``vmap`` over the samples of ``grad`` of the module's own
``functional_call``, g_i = ∇_θ ⟨f(x_i; θ), δ_i⟩ summed over every output), with the layout
of a recurrent module known instead of assumed: the samples are on axis 0 of the input and
output with ``batch_first=True``, axis 1 otherwise, and always on axis 1 of the initial and
final hidden (and cell) states (num_layers·directions, M, H). Several layers and both
directions are the module's own forward, replayed per sample.

Refused by name (:class:`~sdelip.errors.RecurrentInputError`) at the tracked forward pass:
a ``PackedSequence`` input (its data interleaves the samples time step by time step:
no axis carries them; ``engine="coupled"`` differentiates the step's own graph and is
exact there) and an unbatched (2-D) input (no sample axis).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import RecurrentInputError
from .base import Use, get_attr, register_rule
from .fallback import FallbackRule

__all__ = ["RecurrentRule"]


@register_rule(nn.RNNBase)
class RecurrentRule(FallbackRule):
    """nn.RNN/LSTM/GRU: every weight matrix by the fallback, with the recurrent layout of the samples."""

    name = "recurrent"
    supports_general = False  # the layout is known: a recurrent output always carries the samples

    def attach(self, module, attrs_, sink) -> list:
        def check(mod, args, kwargs):
            if not (sink.capturing and torch.is_grad_enabled()):
                return
            x = args[0] if args else kwargs.get("input")
            path = sink.name_of(mod)
            if isinstance(x, PackedSequence):
                raise RecurrentInputError(
                    f"{type(mod).__name__} {path!r} is given a PackedSequence on a tracked step: its data interleaves "
                    "the samples time step by time step, so no axis carries them and the factored engine cannot "
                    "form per-sample gradients; use engine='coupled' (exact: it differentiates the step's own "
                    "graph), or pad the batch instead of packing it"
                )
            if isinstance(x, torch.Tensor) and x.ndim != 3:
                raise RecurrentInputError(
                    f"{type(mod).__name__} {path!r} is given an unbatched input of shape {tuple(x.shape)} on a "
                    "tracked step: the samples must be on one axis of a 3-D input (batch_first or not)"
                )

        return [module.register_forward_pre_hook(check, with_kwargs=True)] + super().attach(module, attrs_, sink)

    @staticmethod
    def _axis(module: nn.Module) -> int:
        return 0 if module.batch_first else 1

    def batch_axes(self, use: Use, M: int) -> list[int]:
        a = self._axis(use.module)
        return [a] if use.output[0].shape[a] == M else []

    def batch_first(self, use: Use):
        return use.x, use.delta

    def sample_axes(self, use: Use, flat_args: list, M: int) -> tuple[list, list]:
        # flattened (args, kwargs): the input first, then hx (a tensor, or LSTM's (h0, c0))
        a = self._axis(use.module)
        args = [None if not isinstance(t, torch.Tensor) else (a if k == 0 else 1) for k, t in enumerate(flat_args)]
        outs = [a] + [1] * (len(use.output) - 1)  # output, then h_n (and c_n)
        return args, outs

    def per_sample_grads(self, use: Use, start: int, stop: int) -> torch.Tensor:
        """One backward of the module per sample (its fused kernels have no vmap batching rule)."""
        from torch.nn.utils.stateless import _reparametrize_module
        from torch.utils._pytree import tree_flatten, tree_unflatten

        (args, kwargs), deltas = use.x, use.delta
        module, attr = use.module, use.attr
        W = get_attr(module, attr).detach()
        flat, spec = tree_flatten((args, kwargs))
        arg_axes, out_axes = self.sample_axes(use, flat, use.output[0].shape[self._axis(module)])
        mask = use.extra["leaves"]
        out = []
        with torch.enable_grad():
            for i in range(start, stop):
                w = W.clone().requires_grad_(True)
                xs = [a.detach().narrow(ax, i, 1) if ax is not None else a for a, ax in zip(flat, arg_axes)]
                a, kw = tree_unflatten(xs, spec)
                with _reparametrize_module(module, {attr: w}, strict=False):
                    res = module.forward(*a, **kw)  # hooks bypassed: not a use of the step
                leaves = [o for o, keep in zip(tree_flatten(res)[0], mask) if keep]
                s = sum((o * d.detach().narrow(ax, i, 1)).sum()
                        for o, d, ax in zip(leaves, deltas, out_axes) if d is not None)
                g = torch.autograd.grad(s, w, allow_unused=True)[0] if isinstance(s, torch.Tensor) \
                    and s.requires_grad else None
                out.append(torch.zeros_like(W) if g is None else g)
        g = torch.stack(out)
        return g.reshape(g.shape[0], g.shape[1], -1)
