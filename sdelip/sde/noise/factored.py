"""The gradient noise of a batch of trajectories without per-sample gradients (docs/theory.md §3, §8).

The parameter SDE of Def 4 needs, at every Euler step and for every trajectory, the
increment √η G dB of the exact low-rank factor G = Ωᵀ/√M of Prop 5 (docs/theory.md §3). With
c_i = √η dB_i / √(M(M−1)) (dB the trajectory's M Brownian coordinates of a noise block),

    G dB √η = Σ_i c_i (g_i − ḡ) = Σ_i (c_i − c̄) g_i = ∇_θ Σ_i (c_i − c̄) ℓ_i,

the gradient of a weighted mini-batch loss: one backward pass, no per-sample gradient.
Each noise block (Assumption 3: one per module) has its own Brownian block, hence its
own weights c^(b). For a tracked Linear or Conv2d module, whose per-sample gradients are
g_i = Σ_p δ_ip x_ipᵀ (inputs x, output gradients δ_i = ∂ℓ_i/∂output_i, docs/theory.md §8), the
weighted gradient of its weight and bias is the module's own weight gradient against the
output gradient c' ∘ δ: one layer-sized vector-Jacobian product per module, all from the
same backward pass. Parameters of other modules (normalisation affine parameters, …) get
one more backward of the network per module, with that module's weights.

The same pass gives what the log K rows of Def 10 need: the layer inputs x and the
per-sample output gradients δ, from which the tracker's factored engine computes the
projections g_i v1 and g_iᵀ u1 (:mod:`sdelip.engines.factored`).

:class:`FactoredNoise` evaluates all of this for a chunk of trajectories in one
``torch.func`` call: ``vmap`` over the trajectories of a function that runs the model
(``functional_call`` with the trajectory's parameters) on its noise mini-batch, with zero
"probe" tensors added to the tracked modules' outputs (their gradient is δ) and their
inputs captured, then ``vjp`` with cotangent 1 per sample. Memory per trajectory: one
forward/backward of M samples and the trajectory's increments, O(P + M·activations);
never O(M·P).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ...engines import EngineError
from ...rules.inventory import TrackedLayer
from ...rules.attention import vmap_safe_attention
from ..layout import ParamLayout

__all__ = ["FactoredNoise"]


class FactoredNoise:
    """Layer inputs, output gradients and noise increments of a batch of trajectories.

    Args:
        model: the network (evaluated functionally; never modified).
        layout: the :class:`~sdelip.sde.ParamLayout` of the state.
        layers: the tracked layers (their modules are the factored noise blocks).
        loss_fn: ``loss_fn(output, target)`` returning the mean loss of a batch; the
            per-sample loss ℓ_i is ``loss_fn`` of the one-sample batch.

    Raises:
        EngineError: (at the first call) a tracked module is called more than once per
            forward pass (shared weights), or not at all.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, layers: Sequence[TrackedLayer], loss_fn: Callable):
        self.model = model
        self.layout = layout
        self.layers = list(layers)
        self.loss_fn = loss_fn
        self._modules = {layer.name: layer.module for layer in self.layers}
        # Noise blocks owned by a tracked module: increments from the module's own VJP.
        self._layer_block: Dict[str, int] = {}
        self._untracked: list = []  # (block index, parameter names)
        for b, block in enumerate(layout.blocks):
            if block.layer is not None:
                self._layer_block[self.layers[block.layer].name] = b
            else:
                self._untracked.append((b, block.params))
        self._out_shapes: Dict[tuple, Dict[str, tuple]] = {}

    # -- shapes ------------------------------------------------------------------------
    def output_shapes(self, params: Dict[str, torch.Tensor], consts: Dict[str, torch.Tensor], x: torch.Tensor):
        """Per tracked layer, the shape of its output for one sample of the form x[0].

        One forward pass of a single sample (cached per input shape) also checks that every
        tracked module is called exactly once.
        """
        key = (tuple(x.shape[1:]), x.dtype, str(x.device))
        shapes = self._out_shapes.get(key)
        if shapes is not None:
            return shapes
        calls: Dict[str, list] = {name: [] for name in self._modules}

        def record(name):
            return lambda mod, inp, out: calls[name].append(tuple(out.shape[1:]))

        one = {k: v[0] for k, v in params.items()}
        with _hooks({n: record(n) for n in self._modules}, self._modules), torch.no_grad():
            functional_call(self.model, {**consts, **one}, (x[:1],))
        for name, seen in calls.items():
            if len(seen) != 1:
                what = "not called" if not seen else f"called {len(seen)} times"
                raise EngineError(
                    f"layer {name!r} is {what} in one forward pass of the model; the factored noise needs each "
                    "tracked layer called exactly once (shared or unused weights): use engine='materialised'"
                )
        shapes = {name: seen[0] for name, seen in calls.items()}
        self._out_shapes[key] = shapes
        return shapes

    def check_layout(self, x: torch.Tensor) -> None:
        """Refuse a tracked module whose input or output does not carry the samples on axis 0.

        The factored noise adds its probes to each tracked module's output with the
        samples first. Two forward passes of the model (no grad, eval mode), on one sample
        and on two, show the layout structurally: axis 0 of every tracked module's input
        and output must have the batch's size in both and the other axes must not change
        (a sequence-first activation (T, M, d), a tensor shared by all samples or samples
        flattened together fail it).

        Raises:
            EngineError: naming the first module that fails, with both shapes.
        """
        seen: Dict[str, list] = {name: [] for name in self._modules}

        def record(name):
            def hook(mod, inp, out):
                first = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
                seen[name].append((None if first is None else tuple(first.shape),
                                   tuple(out.shape) if isinstance(out, torch.Tensor) else None))
            return hook

        was = self.model.training
        self.model.eval()
        try:
            with _hooks({n: record(n) for n in self._modules}, self._modules), torch.no_grad():
                for B in (1, 2):
                    self.model(x[:1].expand(B, *x.shape[1:]))
        finally:
            self.model.train(was)
        for name, calls in seen.items():
            if len(calls) != 2:
                continue  # not called once per forward: output_shapes names it
            (i1, o1), (i2, o2) = calls
            for what, a, b in (("input", i1, i2), ("output", o1, o2)):
                if a is None or b is None or a[0] != 1 or b[0] != 2 or a[1:] != b[1:]:
                    raise EngineError(
                        f"layer {name!r}: its {what} has shape {a} for one sample and {b} for two, so the samples "
                        "are not on its axis 0 (a sequence-first activation, a tensor shared by all samples, or "
                        "samples flattened together); the factored noise needs batch-first layers: use "
                        "engine='materialised' (engine='auto' picks it)"
                    )

    # -- the pass ------------------------------------------------------------------------
    def __call__(
        self,
        params: Dict[str, torch.Tensor],
        consts: Dict[str, torch.Tensor],
        X: torch.Tensor,
        Y: torch.Tensor,
        weights: Optional[Dict[int, torch.Tensor]] = None,
        capture: bool = True,
        shared_batch: bool = False,
    ):
        """Run the noise mini-batches of a chunk of trajectories.

        Args:
            params: {name: (c, *shape)} the trajectories' parameters.
            consts: frozen parameters and buffers (not batched).
            X, Y: the noise mini-batches, (c, M, …), or (M, …) with ``shared_batch``.
            weights: {block index: (c, M)} per-sample weights c_i − c̄ of each noise block's
                increment, or None for no increments.
            capture: return the tracked layers' inputs and output gradients.
            shared_batch: one mini-batch for all trajectories.

        Returns:
            (inputs, deltas, increments): {layer: (c, M, …)} inputs x and per-sample output
            gradients δ_i = ∂ℓ_i/∂output_i (empty dicts without ``capture``), and
            {parameter name: (c, *shape)} the weighted gradients Σ_i w_i g_i (empty without
            ``weights``).
        """
        shapes = self.output_shapes(params, consts, X if shared_batch else X[0])
        model, modules, loss_fn = self.model, self._modules, self.loss_fn
        layer_block, untracked = self._layer_block, self._untracked
        untracked_names = [n for _, names in untracked for n in names]
        prefix = {name: (name + ".") if name else "" for name in modules}

        def per_sample_losses(out, y):
            return vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)

        def one(p, x, y, w):
            M = x.shape[0]
            fixed = {k: v for k, v in p.items() if k not in untracked_names}
            free = {k: p[k] for k in untracked_names}
            probes = {name: x.new_zeros((M, *shapes[name])) for name in modules}

            def forward(probes, free):
                seen: Dict[str, torch.Tensor] = {}

                def hook(name):
                    def h(mod, inp, out):
                        seen[name] = inp[0]
                        return out + probes[name]

                    return h

                with _hooks({n: hook(n) for n in modules}, modules):
                    out = functional_call(model, {**consts, **fixed, **free}, (x,))
                return per_sample_losses(out, y), seen

            losses, pullback, xs = vjp(forward, probes, free, has_aux=True)
            deltas, _ = pullback(torch.ones_like(losses))
            inc: Dict[str, torch.Tensor] = {}
            if w is not None:
                for b, names in untracked:  # one backward per untracked module, with its own weights
                    g = pullback(w[b].to(losses.dtype))[1]
                    inc.update({k: g[k] for k in names})
                for name, module in modules.items():
                    b = layer_block[name]
                    own = {k[len(prefix[name]):]: p[k] for k in self.layout.blocks[b].params}
                    d = deltas[name]
                    wd = d * w[b].to(d.dtype).reshape(-1, *([1] * (d.ndim - 1)))
                    _, layer_pullback = vjp(lambda q, x_=xs[name]: functional_call(module, q, (x_,)), own)
                    (g,) = layer_pullback(wd)
                    inc.update({prefix[name] + k: v for k, v in g.items()})
            if not capture:
                xs, deltas = {}, {}
            return xs, deltas, inc

        in_xy = None if shared_batch else 0
        w_dims = None if weights is None else 0
        with vmap_safe_attention():
            return vmap(one, in_dims=(0, in_xy, in_xy, w_dims), randomness="different")(params, X, Y, weights)


@contextlib.contextmanager
def _hooks(hooks: Dict[str, Callable], modules: Dict[str, nn.Module]):
    """Forward hooks on the named modules for the duration of the block."""
    handles = [modules[name].register_forward_hook(h) for name, h in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
