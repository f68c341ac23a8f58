"""The factored engine: per-sample statistics from the hooks of the user's own backward.

Every tracked weight is applied by a module whose rule (:mod:`sdelip.rules`) reports each
application in the step's forward pass as a use (input x, output). A tensor hook on the
output receives δ = ∂ℓ/∂output during the tracker's own backward of ``losses.mean()``
(δ_i / M, multiplied back by M), and the rule computes the docs/theory.md §8 statistics from
(x, δ) without per-sample gradients of the network: g_i = Σ_p δ_ip x_ipᵀ for linear
maps, patches for convolutions, sparse rows for embeddings, the functional Q/K/V and
output projections inside attention. Dropout needs no care: the hooks see the very
forward pass whose masks produced the loss.

Nothing is guessed and nothing is silent:

- **Batch axis.** A use's rule lists the axes that may carry the M samples (leading axes
  of size M). With one, it is used; with several (a sequence-first (T, M, d) activation
  with T = M) a one-time structural probe decides — the gradient of one sample's loss
  alone is non-zero at one index of the batch axis only — and the answer is cached per
  layer, use and shape; with none, or when the probe cannot tell, an
  :class:`~sdelip.rules.BatchAxisError` names the layer and the step.
- **Broadcast uses.** A use whose output has no sample axis but is broadcast over the
  samples by an add/sub/expand (positions on ``arange(T)``, a class token), and a
  parameter applied only through such broadcasts (timm's ``cls_token``, ``pos_embed``),
  take their per-sample gradients from the consumer's gradient in the step's own
  backward (:mod:`sdelip.rules.broadcast`, the sample axis probed once per shape); other
  uses without a sample axis get per-sample output gradients by a batched backward.
  :attr:`FactoredEngine.routes` says which route each layer took.
- **Other backward passes.** Only the tracker's own backward delivers δ: an
  ``autograd.grad(..., retain_graph=True)`` of the user before ``tracker.backward``
  (gradient-norm logging) leaves the captured inputs in place.
- **Hidden uses.** After the backward, the hooks' Σ_i g_iᵀ u1 is checked against the
  weight gradient the same backward accumulated (M · ∇θ mean ℓ, projected): a weight
  also applied where no rule sees it (``F.linear(x, layer.weight)`` in the user's
  forward) raises an :class:`EngineError` naming the layer and step instead of
  recording a partial or zero gradient.

A weight applied several times (tied weights, a module called several times, the
query/key-value slices of attention's packed projection) sums its uses:
g_i = Σ_uses g_i,use. Projections and Σ_i g_i add up; Σ_i g_i ∘ g_i adds up only for
uses on disjoint rows, else the per-sample gradients of that one layer, summed over the
uses, are formed a chunk of samples at a time (``chunk_bytes``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Mapping, Optional

import torch
from torch import nn

from ..rules import FALLBACK, BatchAxisError, Use, probe_batch_axis
from ..rules import broadcast
from ..rules.base import GENERAL, GENERAL_DONE
from ..rules.linear import linear_statistics, patch_statistics, sequence_linear_statistics  # noqa: F401
from ..core.statistics import EngineError, LayerStatistics, ScaleFn, StatisticsAccumulator, check_scale
from .base import DEFAULT_CHUNK_BYTES, Engine, EngineNotApplicableError, second_order_node, untracked_weight_users
from ..errors import SecondOrderLossError, SharedTensorWarning  # noqa: F401  (defined there, re-exported)

__all__ = ["FactoredEngine", "SharedTensorWarning", "combine_uses", "combine_scaled_projections", "linear_statistics",
           "sequence_linear_statistics", "patch_statistics"]


def _rows(use: Use, m: int) -> slice:
    return use.rows if use.rows is not None else slice(0, m)


def _disjoint(uses, m: int) -> bool:
    spans = sorted((_rows(u, m).start, _rows(u, m).stop) for u in uses)
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def combine_uses(uses, M: int, u1: torch.Tensor, v1: torch.Tensor, split: bool, chunk_bytes: int,
                 with_sum_g: bool = True) -> LayerStatistics:
    """Statistics of g_i = Σ_uses g_i,use, each use on its rows of the weight matrix.

    Args:
        uses: the :class:`~sdelip.rules.Use` of one weight in one forward pass, with δ
            and the batch axis set.
        M: the number of samples.
        u1, v1: the top singular pair of the weight matrix.
        split: also Σ g_i and Σ g_i ∘ g_i.
        chunk_bytes: memory budget of one chunk of per-sample gradients.
        with_sum_g: compute Σ g_i (else left to the caller).
    """
    m, n = u1.shape[0], v1.shape[0]
    if len(uses) == 1 and uses[0].rows is None:
        return uses[0].rule.statistics(uses[0], u1, v1, split, chunk_bytes, with_sum_g)
    kw = dict(dtype=u1.dtype, device=u1.device)
    if not split or _disjoint(uses, m):
        out = LayerStatistics(M, torch.zeros(M, m, **kw), torch.zeros(M, n, **kw),
                              torch.zeros(m, n, **kw) if split and with_sum_g else None,
                              torch.zeros(m, n, **kw) if split else None)
        for use in uses:
            r = _rows(use, m)
            st = use.rule.statistics(use, u1[r], v1, split, chunk_bytes, with_sum_g)
            out.Gv[:, r] += st.Gv
            out.Gtu += st.Gtu
            if out.sum_g is not None:
                out.sum_g[r] += st.sum_g
            if out.sum_sq is not None:
                out.sum_sq[r] += st.sum_sq
        return out
    acc = StatisticsAccumulator(M, (m, n), u1, v1, split=True)
    c = int(max(1, min(M, chunk_bytes // max(1, 2 * m * n * u1.element_size() * len(uses)))))
    for s in range(0, M, c):
        e = min(M, s + c)
        G = torch.zeros(e - s, m, n, **kw)
        for use in uses:
            G[:, _rows(use, m)] += use.rule.per_sample_grads(use, s, e).to(u1.dtype)
        acc.add_per_sample(s, G, overwrite=True)
        del G
    return acc.result()


def _first(t):
    return t[0] if isinstance(t, (tuple, list)) else t


def _first_view(use: Use, g: torch.Tensor) -> torch.Tensor:
    return g if isinstance(use.output, tuple) else use.rule.delta_view(use, g)


def combine_scaled_projections(uses, M: int, S: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor,
                               chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S ∘ g_i) v1 (M, m) and (S ∘ g_i)ᵀ u1 (M, n) of g_i = Σ_uses g_i,use (of ℓ_i as the hooks see it).

    S ∘ g_i = Σ_uses S ∘ g_i,use, so the projections add: a use on the rows r contributes
    (S[r] ∘ g_i,use) v1 to the rows r of the first and (S[r] ∘ g_i,use)ᵀ u1[r] to the second
    (each by its rule's :meth:`~sdelip.rules.LayerRule.scaled_projections`).
    """
    m, n = u1.shape[0], v1.shape[0]
    if len(uses) == 1 and uses[0].rows is None:
        return uses[0].rule.scaled_projections(uses[0], S, u1, v1, M, chunk_bytes)
    kw = dict(dtype=u1.dtype, device=u1.device)
    Gv, Gtu = torch.zeros(M, m, **kw), torch.zeros(M, n, **kw)
    for use in uses:
        r = _rows(use, m)
        gv, gtu = use.rule.scaled_projections(use, S[r], u1[r], v1, M, chunk_bytes)
        Gv[:, r] += gv
        Gtu += gtu
    return Gv, Gtu


class FactoredEngine(Engine):
    """Per-sample statistics from the layer rules' hooks, without per-sample gradients (docs/theory.md §8).

    Applies to every weight a rule names (:mod:`sdelip.rules`; the per-module fallback for
    the others) in a model whose samples are independent (no BatchNorm normalising with
    batch statistics).
    """

    name = "factored"

    def __init__(self, model, layers, split: bool = True, chunk_bytes: Optional[int] = None):
        super().__init__(model, layers, split, DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
        self._handles: list = []
        self._capture = False
        self._ctx: Optional[dict] = None
        self._uses: dict[str, list[Use]] = {}
        self._stats: dict[str, LayerStatistics] = {}
        self._owner: dict[tuple, object] = {}
        self._paths = {id(m): (p or type(m).__name__) for p, m in model.named_modules()}
        self._axis_cache: dict[tuple, int] = {}
        self._edge_cache: dict[tuple, Optional[int]] = {}
        self._versions: dict[int, int] = {}
        self._routes: dict[str, str] = {}
        #: read the per-sample gradients of broadcast uses off their consumers (sdelip.rules.broadcast)
        self.broadcast_uses = broadcast.BROADCAST_USES
        self._warned_general: set = set()
        for layer in self.layers:
            for module, attr, _ in layer.users:
                self._owner[(id(module), attr)] = layer

    # -- the sink the rules report to -----------------------------------------------------------
    @property
    def capturing(self) -> bool:
        return self._capture

    @property
    def routes(self) -> dict[str, str]:
        """How each layer's per-sample gradients were formed at the last tracked step.

        The rule's name (``"linear"``, ``"embedding"``, ``"fallback"``: its hooks, samples on
        one axis), ``"broadcast"`` (a use whose output is broadcast over the samples: δ_i
        read off its consumer's gradient, :mod:`sdelip.rules.broadcast`), ``"parameter"`` (a
        parameter applied only through broadcasts, the same way) or ``"batched backward"``
        (per-sample output gradients by a batched backward).
        """
        return dict(self._routes)

    def name_of(self, module: nn.Module) -> str:
        return self._paths.get(id(module), type(module).__name__)

    def report(self, use: Use) -> None:
        layer = self._owner.get((id(use.module), use.attr))
        if layer is None or not self._capture:
            return
        self._uses.setdefault(layer.name, []).append(use)
        outs = use.output if isinstance(use.output, tuple) else (use.output,)
        self._versions[id(use)] = outs[0]._version
        if isinstance(use.output, tuple):
            use.delta = [None] * len(outs)
        for k, out in enumerate(outs):
            out.register_hook(functools.partial(self._grad_hook, layer, use, k))

    def _grad_hook(self, layer, use: Use, k: int, grad: torch.Tensor):
        ctx = self._ctx
        if ctx is None or use.x is None:  # a backward that is not the tracker's (the user's own, the probe)
            return None
        if use.batch_axis == GENERAL_DONE:  # per-sample output gradients already computed
            return None
        if isinstance(use.delta, list):
            use.delta[k] = grad.detach()
            return None
        use.delta = use.rule.delta_view(use, grad.detach())
        uses = self._uses.get(layer.name, ())
        if layer.uses == 1 and len(uses) == 1 and use.rows is None and use.batch_axis is not None \
                and use.batch_axis >= 0 and ctx["scale_fn"] is None:
            # the only use of the weight: its statistics now, so that x and δ are freed on schedule
            u1, v1 = ctx["directions"][layer.name]
            with torch.no_grad():
                st = use.rule.statistics(use, u1, v1, self.split, self.chunk_bytes,
                                         layer.name not in ctx["sum_g_from_grad"])
                st.scale_(float(ctx["scale"]))
                st.check_finite(layer.name, ctx["step"])
            self._stats[layer.name] = st
            use.release()
        return None

    def check_applicable(self) -> None:
        """Also refuse a tracked weight held by a module that no rule watches for it."""
        super().check_applicable()
        hidden = untracked_weight_users(self.model, self.layers)
        if hidden:
            desc = "; ".join(f"the weight of layer {name!r} is also held by {', '.join(map(repr, users))}"
                             for name, users in hidden.items())
            raise EngineNotApplicableError(
                f"{desc}: its per-sample gradient is the total derivative over every use, and the factored engine "
                "sees only the uses its layer rules report; use engine='materialised' (with loss_fn) or "
                "engine='coupled' (engine='auto' picks coupled)"
            )

    # -- hooks ------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        per_module: dict[int, tuple] = {}
        for layer in self.layers:
            for module, attr, rule in layer.users:
                entry = per_module.setdefault(id(module), (module, rule, []))
                if attr not in entry[2]:
                    entry[2].append(attr)
        for module, rule, attrs_ in per_module.values():
            self._handles.extend(rule.attach(module, attrs_, self))
        self._handles.append(self.model.register_forward_pre_hook(self._new_forward))

    def _new_forward(self, module, args) -> None:
        if self._capture and torch.is_grad_enabled():
            self._uses = {}
            self._versions = {}

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def arm(self, capture: bool) -> None:
        self._capture = bool(capture)
        self._uses = {}
        self._versions = {}

    # -- batch axes ---------------------------------------------------------------------------
    def _resolve_batch_axes(self, losses: torch.Tensor, M: int, step, pending: Optional[list] = None) -> None:
        """Decide for every use how its per-sample output gradients are obtained (module docstring).

        ``pending`` collects the broadcast uses (:mod:`sdelip.rules.broadcast`) whose
        per-sample output gradients the step's own backward delivers.
        """
        unresolved = []
        for name, uses in self._uses.items():
            for k, use in enumerate(uses):
                key = (name, k, tuple(_first(use.output).shape))
                cached = self._axis_cache.get(key)
                if cached is not None:
                    use.batch_axis = cached
                else:
                    unresolved.append((key, use, use.rule.batch_axes(use, M)))
        if unresolved:
            self._probe(losses, unresolved, M, step)
        general = [(name, u) for name, uses in self._uses.items() for u in uses if u.batch_axis == GENERAL]
        if general and self.broadcast_uses and pending is not None:
            general = self._route_broadcast_uses(losses, general, M, pending)
        if general:
            for name, use in general:
                self._routes[name] = "batched backward"
                if name not in self._warned_general:
                    self._warned_general.add(name)
                    warnings.warn(
                        f"layer {name!r}: its output at step {step} does not carry the M = {M} samples on one axis "
                        f"(shape {tuple(_first(use.output).shape)}: a tensor shared by every sample, such as a "
                        "position table applied to arange(T), or samples flattened together); its per-sample "
                        "gradients are exact but need a batched backward, about M times the cost of the layer's "
                        "backward. Expand the input over the batch (e.g. pos(arange(T).expand(M, T))) for the "
                        "factored path",
                        SharedTensorWarning, stacklevel=4,
                    )
            self._general_deltas(losses, general, M, step)

    # -- broadcast uses (sdelip.rules.broadcast) --------------------------------------------------
    def _broadcast_plan(self, losses, targets: dict, M: int) -> dict:
        """key → the confirmed broadcast edges into the target, or None where one of its edges is not one.

        ``targets``: key → (tensor, cache key). An edge is confirmed by the structural probe
        (:meth:`_probe_edges`, cached per edge and shapes): the gradient of one sample's loss
        alone is non-zero at that sample's index of the candidate axis only.
        """
        found = broadcast.consumer_edges(losses, {k: t for k, (t, _) in targets.items()})
        plans: dict = {}
        probe = []
        for key, pairs in found.items():
            tensor, ckey = targets[key]
            plan = [] if pairs else None
            for n, (node, slot) in enumerate(pairs):
                edge = broadcast.broadcast_edge(node, slot, tuple(tensor.shape), M)
                if edge is None:
                    plan = None
                    break
                ck = (ckey, n, node.name(), slot, tuple(tensor.shape), edge.result_shape)
                if ck in self._edge_cache:
                    edge.axis = self._edge_cache[ck]
                    if edge.axis is None:  # probed before: not a broadcast over the samples
                        plan = None
                        break
                else:
                    probe.append((ck, edge, tensor))
                plan.append(edge)
            plans[key] = plan
        if probe:
            self._probe_edges(losses, probe, M)
        return {k: (p if p is not None and all(e.axis is not None for e in p) else None) for k, p in plans.items()}

    def _probe_edges(self, losses, entries: list, M: int) -> None:
        """The sample axis of each broadcast edge's result: the gradient of ℓ_j alone is non-zero at index j only."""
        for j in dict.fromkeys((0, M - 1, M // 2)):
            if not entries:
                return
            grads: dict = {}
            nodes = {id(e.node): e.node for _, e, _ in entries}
            handles = [node.register_prehook(functools.partial(_capture, grads, key)) for key, node in nodes.items()]
            inputs = list({id(t): t for _, _, t in entries}.values())
            try:
                torch.autograd.grad(losses[j], inputs, retain_graph=True, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
            left = []
            for ck, edge, t in entries:
                G = grads.get(id(edge.node))
                if G is None or not bool((G != 0).any()):
                    left.append((ck, edge, t))  # this sample's loss does not reach the edge: ask another
                    continue
                good = probe_batch_axis(G, edge.candidates, j)
                if len(good) > 1:
                    edge.candidates = good
                    left.append((ck, edge, t))
                    continue
                edge.axis = good[0] if good else None
                self._edge_cache[ck] = edge.axis
            entries = left
        # the probe could not tell (asked again next step): these edges take the general route this step

    def _route_broadcast_uses(self, losses, general: list, M: int, pending: list) -> list:
        """Route the general uses whose output is broadcast over the samples (returns the others)."""
        targets = {}
        for k, (name, use) in enumerate(general):
            out = use.output
            if isinstance(out, tuple):
                if len(out) != 1:
                    continue
                out = out[0]
            if out._version != self._versions.get(id(use), -1):  # modified in place after the use
                continue
            index = next(i for i, u in enumerate(self._uses[name]) if u is use)
            targets[k] = (out, (name, index))
        if not targets:
            return general
        plans = self._broadcast_plan(losses, targets, M)
        rest = []
        for k, (name, use) in enumerate(general):
            plan = plans.get(k)
            if plan is None:
                rest.append((name, use))
                continue
            out = targets[k][0]
            use.batch_axis = GENERAL_DONE  # the output hook leaves it alone; δ per sample after the backward
            use.delta = None
            pending.append((plan, out, functools.partial(self._finish_use, use, M)))
            self._routes[name] = "broadcast"
        return rest

    @staticmethod
    def _finish_use(use: Use, M: int, D: Optional[torch.Tensor]) -> None:
        if D is None:  # the loss does not depend on the use
            use.release()
        else:
            use.rule.expand_general(use, D, M)

    def _route_parameters(self, losses, M: int, pending: list) -> None:
        """Parameters of the fallback applied only through broadcasts: per-sample gradients from the step's backward.

        Replaces the per-module fallback (``torch.func`` over the module holding the
        parameter: for timm's ``cls_token`` and ``pos_embed``, the whole model) when every
        edge of the graph into the parameter is a broadcast over the samples.
        """
        layers = {layer.name: layer for layer in self.layers}
        targets = {name: (layers[name].weight, (name, "parameter")) for name, uses in self._uses.items()
                   if uses and all(u.rule is FALLBACK for u in uses) and layers[name].weight.requires_grad}
        if not targets:
            return
        plans = self._broadcast_plan(losses, targets, M)
        for name, plan in plans.items():
            if plan is None:
                continue
            for u in self._uses[name]:
                u.release()
            self._uses[name] = []
            module, attr, _ = layers[name].users[0]
            pending.append((plan, layers[name].weight, functools.partial(self._finish_parameter, name, module, attr)))
            self._routes[name] = "parameter"

    def _finish_parameter(self, name: str, module, attr: str, D: Optional[torch.Tensor]) -> None:
        self._uses[name] = [] if D is None else [broadcast.parameter_use(module, attr, D)]

    def _probe(self, losses, unresolved, M: int, step) -> None:
        """One-time structural probe: the gradient of one sample's loss alone shows which axis holds the samples.

        A candidate axis a is confirmed when ∂ℓ_j/∂output is non-zero at index j of axis a
        only. When the gradient of ℓ_j is non-zero elsewhere on every candidate (a tensor
        shared by all samples, such as a positional embedding of ``arange(T)``, or samples
        flattened together), the use is computed in the general way: per-sample output
        gradients by a batched backward. Cached per layer, use and output shape.
        """
        silent = {id(use) for _, use, _ in unresolved}  # uses no probed sample's loss has reached yet
        probed: set = set()

        def probe(j, entries):
            probed.add(j)
            outs = [_first(use.output) for _, use, _ in entries]
            grads = torch.autograd.grad(losses[j], outs, retain_graph=True, allow_unused=True)
            left = []
            for (key, use, cands), g in zip(entries, grads):
                g = None if g is None else _first_view(use, g)
                if g is None or not bool((g != 0).any()):
                    left.append((key, use, cands))  # this sample's loss does not reach the use: ask another
                    continue
                silent.discard(id(use))
                good = probe_batch_axis(g, cands, j)
                if len(good) > 1:
                    left.append((key, use, good))
                    continue
                use.batch_axis = good[0] if good else GENERAL
                self._axis_cache[key] = use.batch_axis
            return left

        for j in dict.fromkeys((0, M - 1, M // 2)):
            unresolved = probe(j, unresolved)
            if not unresolved:
                return
        quiet = [e for e in unresolved if id(e[1]) in silent]
        if quiet:
            # No probed sample reached these uses. The gradient of Σ_i r_i ℓ_i with random weights r
            # is zero only if every ∂ℓ_i/∂output is (almost surely): then g_i = 0 exactly for every
            # sample (a zero-initialised branch, ReLUs all dead at this step) and the layer's terms
            # are those of a zero gradient; the batch axis is resolved at the first step that can.
            gen = torch.Generator(device=losses.device).manual_seed(1 + len(probed))
            r = torch.rand(M, generator=gen, device=losses.device, dtype=losses.dtype) + 0.5
            flat = [(e, o) for e in quiet for o in (e[1].output if isinstance(e[1].output, tuple) else (e[1].output,))]
            grads = torch.autograd.grad(losses, [o for _, o in flat], grad_outputs=r, retain_graph=True,
                                        allow_unused=True)
            weighted: dict[int, list] = {}
            for (e, _), g in zip(flat, grads):
                weighted.setdefault(id(e[1]), []).append(g)
            for e in quiet:
                gs = weighted[id(e[1])]
                if all(g is None or not bool((g != 0).any()) for g in gs):
                    e[1].release()  # g_i = 0 for every i: no statistics to form, nothing cached
                    e[1].batch_axis = None
                    unresolved = [u for u in unresolved if u[1] is not e[1]]
                    continue
                # some sample reaches the use: ask the samples at the non-zero indices of each candidate axis
                g0 = _first_view(e[1], gs[0]) if gs[0] is not None else None
                if g0 is None:
                    continue
                nz = g0 != 0
                for a in e[2]:
                    idx = nz.movedim(a, 0).reshape(nz.shape[a], -1).any(1).nonzero().flatten().tolist()
                    for j in [i for i in idx if i < M and i not in probed][:2]:
                        if not any(u[1] is e[1] for u in unresolved):
                            break
                        unresolved = [u for u in unresolved if u[1] is not e[1]] + probe(j, [u for u in unresolved if u[1] is e[1]])
            if not unresolved:
                return
        for key, use, cands in unresolved:  # the probe could not tell: exact in the general way, asked again next step
            use.batch_axis = GENERAL

    def _general_deltas(self, losses, general, M: int, step) -> None:
        """Per-sample output gradients ∂(ℓ_i/M)/∂output of uses whose output does not carry the samples on one axis."""
        for name, use in general:
            if not use.rule.supports_general:
                raise BatchAxisError(
                    f"layer {name!r} at step {step}: its {use.rule.name} rule needs the M = {M} samples on one axis "
                    f"of its input {_shape(use.x)}, but the gradient of a single sample's loss spreads over every "
                    "candidate axis (samples flattened together or mixed); use engine='materialised'"
                )
        outs = [_first(use.output) for _, use in general]
        eye = torch.eye(M, dtype=losses.dtype, device=losses.device) / M
        try:
            deltas = torch.autograd.grad(losses, outs, grad_outputs=eye, retain_graph=True, allow_unused=True,
                                         is_grads_batched=True)
        except RuntimeError:  # an operation without a batching rule: one backward per sample
            per = [torch.autograd.grad(losses[i] / M, outs, retain_graph=True, allow_unused=True) for i in range(M)]
            deltas = [None if all(p[k] is None for p in per) else
                      torch.stack([torch.zeros_like(o) if p[k] is None else p[k] for p in per])
                      for k, o in enumerate(outs)]
        for (name, use), D in zip(general, deltas):
            if D is None:
                use.release()
                continue
            use.rule.expand_general(use, D.detach(), M)

    # -- step -------------------------------------------------------------------------------
    def backward(
        self,
        losses: torch.Tensor,
        directions: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        batch=None,
        step: Optional[int] = None,
        scale: Optional[ScaleFn] = None,
    ) -> dict[str, LayerStatistics]:
        """The step's backward and the per-sample statistics (:meth:`Engine.backward`).

        With ``scale``, the uses' inputs and output gradients are kept until the end of the
        backward (no statistics inside the hooks); each layer's raw statistics (with Σ g_i
        and Σ g_i² whatever ``split``) are computed and checked as without it, then S =
        ``scale(name, ḡ, diag Σ̂)`` and, when S is not None, the projections of S ∘ g_i by the
        rules (:func:`combine_scaled_projections`) replace ``Gv`` and ``Gtu``.
        """
        M = losses.shape[0]
        split = self.split or scale is not None
        if not self._uses:
            raise EngineError(
                f"no forward pass of the tracked layers was recorded for step {step}: create the Tracker before "
                "the step's forward pass, run the forward with gradients enabled, and call tracker.backward "
                "once per forward"
            )
        node = second_order_node(losses)
        if node is not None:
            self._uses = {}
            raise SecondOrderLossError(
                f"step {step}: the losses contain a gradient taken with create_graph=True (a gradient penalty such as "
                f"ℓ + λ‖∂ℓ/∂x‖²; node {node} in their graph): the weights enter the loss also through the backward "
                "graph of that gradient, which no layer hook sees, so the factored engine cannot form its per-sample "
                "gradients; use engine='coupled' (exact: it differentiates the losses themselves)"
            )
        self._stats = {}
        self._routes = {name: (uses[0].rule.name if uses else "none") for name, uses in self._uses.items()}
        pending: list = []
        if self.broadcast_uses:
            self._route_parameters(losses, M, pending)
        self._resolve_batch_axes(losses, M, step, pending)
        # Σ_i g_i is M times the weight gradient the backward accumulates; the same gradient checks
        # that the hooks saw every use of the weight (a hook on the weight could make them differ).
        checked, before = set(), {}
        for layer in self.layers:
            w = layer.weight
            if w.is_leaf and not getattr(w, "_backward_hooks", None) \
                    and not getattr(w, "_post_accumulate_grad_hooks", None):
                checked.add(layer.name)
                before[layer.name] = None if w.grad is None else _dense(w.grad).clone()
        from_grad = checked if split else set()
        ctx = {"M": M, "directions": directions, "step": step, "scale": M, "sum_g_from_grad": from_grad,
               "scale_fn": scale}
        self._ctx = ctx
        handles, sums = self._capture_broadcasts(pending)
        try:
            losses.mean().backward()
        finally:
            self._ctx = None
            for h in handles:
                h.remove()
        for (_, _, finish), D in zip(pending, sums):
            finish(D[0])
        uses, self._uses = self._uses, {}
        live_uses: dict[str, list] = {}
        with torch.no_grad():
            for name, layer_uses in uses.items():
                if name in self._stats:
                    continue
                live = [u for u in layer_uses if _has_delta(u)]
                if not live:
                    continue
                for u in live:
                    if isinstance(u.delta, list):
                        u.delta = [torch.zeros_like(o) if d is None else d for o, d in zip(u.output, u.delta)]
                u1, v1 = directions[name]
                st = combine_uses(live, M, u1, v1, split, self.chunk_bytes, name not in from_grad)
                st.scale_(float(M))
                st.check_finite(name, step)
                self._stats[name] = st
                if scale is not None:  # kept for the projections of S ∘ g_i, released by _apply_scale
                    live_uses[name] = live
                for u in layer_uses:
                    if scale is None or not any(u is v for v in live):
                        u.release()
        out = {}
        for layer in self.layers:
            u1, v1 = directions[layer.name]
            st = self._stats.get(layer.name)
            if st is None:  # not applied in this forward, or the loss does not depend on it: g_i = 0
                m, n = u1.shape[0], v1.shape[0]
                z = dict(dtype=u1.dtype, device=u1.device)
                st = LayerStatistics(
                    M, torch.zeros(M, m, **z), torch.zeros(M, n, **z),
                    torch.zeros(m, n, **z) if split else None, torch.zeros(m, n, **z) if split else None,
                )
            if layer.name in checked:
                w = layer.weight
                g = torch.zeros_like(w) if w.grad is None else _dense(w.grad).detach()
                if before[layer.name] is not None:
                    g = g - before[layer.name]
                gm = layer.rule.matrix(g).to(u1.dtype)  # ∇θ mean ℓ: Σ_i g_i / M
                self._check_hidden_uses(layer.name, st, (gm.mT @ u1) * M, step)
                if layer.name in from_grad:
                    st.sum_g = gm * M
            if scale is not None:
                self._apply_scale(layer, st, scale, live_uses.pop(layer.name, ()), M, u1, v1, step)
            out[layer.name] = st
        self._stats = {}
        return out

    @staticmethod
    def _capture_broadcasts(pending: list) -> tuple[list, list]:
        """Hooks on the consumers of the broadcast uses: each adds its per-sample gradients of the shared tensor."""
        handles, sums = [], []
        for plan, tensor, _ in pending:
            acc = [None]
            sums.append(acc)
            for edge in plan:
                def hook(grad_outputs, edge=edge, acc=acc, shape=tuple(tensor.shape), dtype=tensor.dtype):
                    G = grad_outputs[0]
                    if G is not None:
                        with torch.no_grad():
                            D = broadcast.per_sample_gradient(G.detach(), edge.axis, shape, edge.factor)
                            D = D.to(dtype, copy=True)
                        acc[0] = D if acc[0] is None else acc[0].add_(D)
                    return None
                handles.append(edge.node.register_prehook(hook))
        return handles, sums

    def _apply_scale(self, layer, st: LayerStatistics, scale: ScaleFn, live, M: int, u1, v1, step) -> None:
        """S = scale(name, ḡ, diag Σ̂) of the raw statistics; with S, Gv and Gtu become those of S ∘ g_i."""
        try:
            with torch.no_grad():
                S = check_scale(scale(layer.name, st.mean(), st.noise_var()), (u1.shape[0], v1.shape[0]), u1,
                                layer.name, step)
                if S is None:
                    return
                if live:  # δ of the hooks is that of ℓ_i / M
                    Gv, Gtu = combine_scaled_projections(live, M, S, u1, v1, self.chunk_bytes)
                    st.Gv, st.Gtu = Gv.mul_(float(M)), Gtu.mul_(float(M))
                else:  # the layer was not applied, or the loss does not depend on it: g_i = 0
                    st.Gv, st.Gtu = torch.zeros_like(st.Gv), torch.zeros_like(st.Gtu)
                st.scale = S
                st.check_finite(layer.name, step)
        finally:
            for u in live:
                u.release()

    def _check_hidden_uses(self, name: str, st: LayerStatistics, total: torch.Tensor, step) -> None:
        """Σ_i g_iᵀ u1 from the hooks must equal ``total`` = (M ∇θ mean ℓ)ᵀ u1 from the same backward."""
        seen = st.Gtu.sum(0)
        diff = float((seen - total).norm())
        scale = max(float(seen.norm()), float(total.norm()))
        rtol = 1e-6 if total.dtype == torch.float64 else 1e-3
        if diff > rtol * scale + 1e-30:
            raise EngineError(
                f"layer {name!r} at step {step}: the per-sample gradients seen by its rule's hooks sum to "
                f"‖Σ g_iᵀu1‖ = {float(seen.norm()):.6g}, but the weight gradient of the same backward gives "
                f"{float(total.norm()):.6g}: the weight is also applied where no layer rule sees it (e.g. "
                "F.linear(x, module.weight) in the forward, or a module type whose rule does not watch that call), or "
                "the losses depend on the weight through a gradient taken with create_graph=True; use "
                "engine='coupled' (exact in both cases)"
            )


def _capture(store: dict, key, grad_outputs):
    store[key] = grad_outputs[0]
    return None


def _has_delta(use: Use) -> bool:
    if isinstance(use.delta, list):
        return any(d is not None for d in use.delta)
    return use.delta is not None


def _dense(g: torch.Tensor) -> torch.Tensor:
    return g.to_dense() if g.is_sparse else g


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else "(call arguments)"
