"""Broadcast uses: a tensor shared by every sample, added to (or expanded over) the samples (docs/theory.md §8).

A position table applied to ``arange(T)`` (Hugging Face GPT-2 and BERT build their
positions with a size-1 batch axis), a class token, a learned query or a position table
held as a bare ``nn.Parameter`` (timm's ``cls_token``, ``pos_embed``) produce a tensor s
without a sample axis, which the model then *broadcasts* over the batch:

    r = a + α s      (``AddBackward0``; ``SubBackward0``: r = a − α s),   r = s.expand(…)   (``ExpandBackward0``),

with r carrying the M samples on an axis b where s has size 1 (or no axis at all). The
per-sample output gradient of s is then read off the gradient of r in the very backward
that trains the model, without any per-sample backward: if the gradient of one sample's
loss alone is non-zero at index i of axis b of r only (ℓ_i depends on r only through its
slice r_i — the structural probe of :func:`~sdelip.rules.probe_batch_axis`, done once per
shape), then with G = ∂(mean ℓ)/∂r

    ∂(ℓ_i / M)/∂s = c · sum_to_shape(s)(G restricted to index i of axis b),

c = 1 for the expand and for a, α for the second operand of an add, −α of a subtraction:
the chain rule through the broadcast, whose backward is exactly that sum (autograd itself
computes ∂(mean ℓ)/∂s = Σ_i of these). Summed over every edge of the autograd graph
that consumes s, this is the exact per-sample gradient with respect to s, as the batched
backward of :meth:`~sdelip.engines.FactoredEngine` would give it at about M times the
cost.

Two routes use it (:class:`~sdelip.engines.FactoredEngine`):

- a **use** reported by a layer rule whose output carries no sample axis (the position
  :class:`~torch.nn.Embedding` on ``arange(T)``): the per-sample output gradients go to
  the rule's :meth:`~sdelip.rules.LayerRule.expand_general`, as those of the batched
  backward would;
- a **parameter** held directly by a module (no rule applies it: timm's ``cls_token``,
  ``pos_embed``) whose every edge in the graph is one of the broadcasts above: then the
  per-sample gradient of θ itself is Σ_edges of the formula, and no ``torch.func`` call
  of the module that holds it (for timm's ViT: the whole model) is made
  (:class:`ParameterUseRule`).

A tensor consumed by any other operation (a product, an index, a reshape), or whose
consumer's output does not carry the samples on one axis, is not a broadcast use: it
keeps the exact general route (batched backward, or the per-module fallback).
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from ..core.statistics import LayerStatistics, StatisticsAccumulator
from .base import GENERAL_DONE, LayerRule, Use

__all__ = ["BROADCAST_USES", "BroadcastEdge", "ParameterUseRule", "PARAMETER_USE", "consumer_edges",
           "broadcast_edge", "per_sample_gradient"]

#: Whether a new factored engine reads the per-sample gradients of broadcast uses off the
#: consumer's gradient (True) or computes them by the batched backward / the per-module
#: fallback as before (False: the benchmark's "before"); per engine:
#: ``FactoredEngine.broadcast_uses``.
BROADCAST_USES = True

#: Autograd nodes through which a tensor is broadcast over the samples unchanged (times a constant).
_BROADCASTS = ("AddBackward0", "SubBackward0", "ExpandBackward0")


@attrs.define(eq=False)
class BroadcastEdge:
    """One edge of the autograd graph from a broadcast node to the shared tensor s.

    Attributes:
        node: the consumer's autograd node (its gradient output is ∂(mean ℓ)/∂r).
        slot: which input of the node s is.
        factor: c of the module docstring (∂r/∂s = c · broadcast).
        result_shape: the shape of r.
        candidates: the axes of r that may carry the samples (size M, size 1 or missing in s).
        axis: the confirmed sample axis of r, once probed.
    """

    node: object
    slot: int
    factor: float
    result_shape: tuple
    candidates: list
    axis: Optional[int] = None


def consumer_edges(losses: torch.Tensor, targets: dict) -> dict:
    """Every edge of the losses' autograd graph into each target.

    Args:
        losses: the per-sample losses (their ``grad_fn`` is the root of the walk).
        targets: key → a tensor: a non-leaf (its ``grad_fn``, ``output_nr``) or a leaf
            parameter (its ``AccumulateGrad`` node).

    Returns:
        key → list of (node, slot) with ``node.next_functions[slot]`` the target, in the
        walk's order (deterministic for a graph of the same structure).
    """
    # Nodes are compared by identity: every Python object of a node met is kept alive until the
    # walk ends (a node's object is unique while it lives; a freed one's id could be reused).
    by_node, by_leaf, alive = {}, {}, []
    for key, t in targets.items():
        fn = t.grad_fn
        if fn is not None:
            alive.append(fn)
            by_node[(id(fn), t.output_nr)] = key
        else:
            by_leaf[id(t)] = key
    out: dict = {key: [] for key in targets}
    root = losses.grad_fn
    if root is None:
        return out
    seen, stack = {id(root): root}, [root]
    while stack:
        node = stack.pop()
        for slot, (nxt, nr) in enumerate(node.next_functions):
            if nxt is None:
                continue
            key = by_node.get((id(nxt), nr))
            if key is None and by_leaf and hasattr(nxt, "variable"):
                key = by_leaf.get(id(nxt.variable))
            if key is not None:
                out[key].append((node, slot))
            if id(nxt) not in seen:
                seen[id(nxt)] = nxt
                stack.append(nxt)
    del alive
    return out


def broadcast_edge(node, slot: int, shape: tuple, M: int) -> Optional[BroadcastEdge]:
    """The edge (node, slot) into a tensor of ``shape`` as a broadcast over M samples, or None if it is not one."""
    name = node.name()
    if name not in _BROADCASTS:
        return None
    meta = node._input_metadata
    if len(meta) != 1 or meta[0].is_nested_tensor or meta[0].is_cpp_nested_tensor:
        return None
    result = tuple(meta[0].shape)
    if len(result) < len(shape):
        return None
    if name == "ExpandBackward0":
        factor = 1.0
    else:
        alpha = node._saved_alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            return None
        factor = 1.0 if slot == 0 else (float(alpha) if name == "AddBackward0" else -float(alpha))
    padded = (1,) * (len(result) - len(shape)) + tuple(shape)
    if any(s not in (1, r) for s, r in zip(padded, result)):
        return None
    cands = [b for b, (s, r) in enumerate(zip(padded, result)) if s == 1 and r == M]
    if not cands:
        return None
    return BroadcastEdge(node, slot, factor, result, cands)


def per_sample_gradient(G: torch.Tensor, axis: int, shape: tuple, factor: float) -> torch.Tensor:
    """∂(ℓ_i / M)/∂s for every i, (M, *shape), from G = ∂(mean ℓ)/∂r (module docstring).

    Args:
        G: the gradient of the consumer's result r, samples on ``axis``.
        axis: the sample axis of r.
        shape: the shape of s (broadcast to r's shape, aligned on the right).
        factor: c, ∂r/∂s = c · broadcast.
    """
    M = G.shape[axis]
    padded = (1,) * (G.ndim - len(shape)) + tuple(shape)
    D = G.movedim(axis, 0)
    rest = padded[:axis] + padded[axis + 1:]
    dims = [k + 1 for k, (s, r) in enumerate(zip(rest, D.shape[1:])) if s == 1 and r != 1]
    if dims:
        D = D.sum(dims, keepdim=True)
    D = D.reshape(M, *shape)
    return D * factor if factor != 1.0 else D


class ParameterUseRule(LayerRule):
    """A parameter applied only through broadcasts (module docstring): its per-sample gradients, dense.

    Not registered by module type: the factored engine gives a layer this rule for a step
    when every edge of the autograd graph into its weight is a broadcast over the samples.
    ``use.delta`` holds ∂(ℓ_i / M)/∂θ (M, *θ.shape) — the per-sample gradients themselves.
    """

    name = "parameter"

    def statistics(self, use: Use, u1, v1, split, chunk_bytes, with_sum_g=True) -> LayerStatistics:
        M = use.delta.shape[0]
        acc = StatisticsAccumulator(M, (u1.shape[0], v1.shape[0]), u1, v1, split)
        acc.add_per_sample(0, self.per_sample_grads(use, 0, M))
        return acc.result()

    def per_sample_grads(self, use: Use, start: int, stop: int) -> torch.Tensor:
        D = use.delta[start:stop]  # (c, *θ.shape), θ with two or more dimensions
        return D.reshape(D.shape[0], D.shape[1], -1)


#: The one instance (like :data:`~sdelip.rules.fallback.FALLBACK`).
PARAMETER_USE = ParameterUseRule()


def parameter_use(module, attr: str, D: torch.Tensor) -> Use:
    """A :class:`Use` of ``module.<attr>`` whose per-sample gradients D = ∂(ℓ_i / M)/∂θ are known."""
    return Use(PARAMETER_USE, module, attr, None, None, delta=D, batch_axis=GENERAL_DONE)
