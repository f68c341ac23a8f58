"""Layer rules: which weight matrices a module holds and how their per-sample statistics are formed.

A rule is registered for one or more module types with :func:`register_rule`. It names
the module's weight matrices θ^(ℓ) (:meth:`LayerRule.weights`), their m × n view
(:meth:`LayerRule.matrix`, the paper's θ^(ℓ), Prop 9), how a forward pass applies them
(:meth:`LayerRule.attach`: hooks that report every application as a :class:`Use`) and the
per-sample statistics of docs/theory.md §8 from a use's input x and output gradient δ
(:meth:`LayerRule.statistics`, :meth:`LayerRule.per_sample_grads`).

Every other part of sdelip asks the registry (:func:`rule_for`, :func:`claims`); nothing
else tests layer types. Adding a layer type is one module with one rule class and its
test (docs/tracking.md, "Adding a layer type").

Which axis carries the samples is never guessed: a use lists the axes of its input that
may (:meth:`LayerRule.batch_axes`, the leading axes of size M); when more than one
qualifies (a sequence-first (T, M, d) activation with T = M), the factored engine decides
with a one-time structural probe (:func:`probe_batch_axis`) or raises.
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, Iterable, Optional, Sequence

import attrs
import torch
from torch import nn

from ..errors import BatchAxisError, RuleError  # noqa: F401  (defined there, re-exported)

__all__ = [
    "LayerRule",
    "Use",
    "Claim",
    "register_rule",
    "rule_for",
    "registered_rules",
    "claims",
    "RuleError",
    "BatchAxisError",
    "GENERAL",
    "GENERAL_DONE",
]


#: ``Use.batch_axis`` of a use whose output does not carry the samples on one axis (a tensor
#: shared by every sample, samples flattened together): its per-sample output gradients come
#: from a batched backward (:meth:`sdelip.engines.FactoredEngine`).
GENERAL = -1
#: ... once they are in place (x expanded over the samples, δ per sample, samples on axis 0).
GENERAL_DONE = -2


@attrs.define(eq=False)
class Use:
    """One application of a tracked weight in a forward pass.

    Attributes:
        rule: the rule that reported it.
        module: the module applying the weight.
        attr: the weight's attribute path relative to ``module`` (``"weight"``,
            ``"in_proj_weight"``, ``"out_proj.weight"``).
        x: the input the weight is applied to (rule-specific layout; for linear maps
            ``(..., n)``, for convolutions ``(N, C, *spatial)``, for embeddings the indices).
        output: the tensor whose gradient is δ (kept until the tracker's backward).
        rows: the rows of the weight matrix this use applies (a functional use of a
            slice, e.g. the query rows of ``in_proj_weight``); None for all rows.
        delta: the gradient of the tracker's loss with respect to ``output``, set by the
            backward hook; None until then (or if the loss does not depend on it).
        batch_axis: the axis of x (and δ) that carries the samples, once known.
        extra: rule-specific data (e.g. the fallback's call arguments).
    """

    rule: "LayerRule"
    module: nn.Module
    attr: str
    x: object
    output: Optional[torch.Tensor] = None
    rows: Optional[slice] = None
    delta: Optional[torch.Tensor] = None
    batch_axis: Optional[int] = None
    extra: Optional[dict] = None

    def release(self) -> None:
        """Drop the references to the activations (after the statistics are computed)."""
        self.x = self.output = self.delta = self.extra = None


@attrs.frozen
class Claim:
    """A module's claim on one weight Parameter: ``module.<attr>`` is a weight matrix of ``rule``."""

    path: str
    module: nn.Module = attrs.field(eq=False, repr=False)
    rule: "LayerRule" = attrs.field(eq=False)
    attr: str

    @property
    def parameter(self) -> torch.Tensor:
        return get_attr(self.module, self.attr)

    @property
    def layer_name(self) -> str:
        """The layer name: a module's ``.weight`` keeps the module path, other weights their full name."""
        owner, _, last = self.attr.rpartition(".")
        base = ".".join(p for p in (self.path, owner) if p)
        if last == "weight":
            return base
        return ".".join(p for p in (base, last) if p)


def get_attr(module: nn.Module, attr: str):
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class LayerRule(abc.ABC):
    """How sdelip tracks the weight matrices of one family of modules (docs/theory.md §8).

    Subclasses set :attr:`module_types` through :func:`register_rule` and implement
    :meth:`statistics` and :meth:`per_sample_grads`; the defaults cover a module whose
    ``weight`` is applied by its own forward to its first input (Linear, Conv, Embedding).
    """

    #: Module types the rule applies to (set by :func:`register_rule`).
    module_types: ClassVar[tuple] = ()
    #: Short name shown in metadata and ``sdelip info``.
    name: ClassVar[str] = "rule"
    #: Whether the factored SDE engine (:mod:`sdelip.sde`) can use the rule: the weight
    #: is ``module.weight``, applied by the module's forward to a batch-first input.
    sde_factored: ClassVar[bool] = False

    # -- which weights -------------------------------------------------------------------
    def weights(self, module: nn.Module) -> list[str]:
        """Attribute paths of the module's weight matrices that the rule tracks."""
        w = getattr(module, "weight", None)
        return ["weight"] if isinstance(w, torch.Tensor) else []

    def covers(self, module: nn.Module) -> list[str]:
        """Paths of submodules whose weights this rule tracks instead of their own rule."""
        return []

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The m × n view θ of a weight (Prop 9): rows = outputs, columns = inputs."""
        return weight.reshape(weight.shape[0], -1)

    def couples_samples(self, module: nn.Module) -> bool:
        """Whether the module's forward mixes the samples of a batch (BatchNorm with batch statistics)."""
        return False

    def check_module(self, module: nn.Module, path: str) -> None:
        """Raise ValueError naming ``path`` if the module is configured in a way the rule cannot track exactly."""

    # -- how a forward pass applies them ---------------------------------------------------
    def attach(self, module: nn.Module, attrs_: Sequence[str], sink) -> list:
        """Install hooks on ``module`` that report every application of a tracked weight.

        ``sink`` has ``capturing`` (whether the forward belongs to a tracked step),
        ``report(use)`` and ``name_of(module)``. The default: a forward hook reporting
        ``module.weight`` applied to the module's first input. Returns the hook handles.
        """
        def hook(mod, inputs, output):
            if not sink.capturing or not torch.is_grad_enabled():
                return
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor) \
                    and output.requires_grad:
                sink.report(Use(self, mod, "weight", inputs[0], output))

        return [module.register_forward_hook(hook)]

    def delta_view(self, use: Use, delta: torch.Tensor) -> torch.Tensor:
        """The output gradient in the layout of ``use.x`` (default: as received)."""
        return delta

    # -- which axis carries the samples ----------------------------------------------------
    def batch_axes(self, use: Use, M: int) -> list[int]:
        """Axes of ``use.x`` (and of δ) that may carry the M samples (default: leading axes of size M)."""
        x = use.x
        return [a for a in range(x.ndim - 1) if x.shape[a] == M]

    def batch_first(self, use: Use) -> tuple[torch.Tensor, torch.Tensor]:
        """x and δ with the batch axis moved to the front."""
        a = use.batch_axis if use.batch_axis is not None and use.batch_axis >= 0 else 0
        return use.x.movedim(a, 0), use.delta.movedim(a, 0)

    #: Whether :meth:`expand_general` applies: the use is a linear map of a tensor shared
    #: by the samples (x without a batch axis), so per-sample output gradients suffice.
    supports_general: ClassVar[bool] = True

    def expand_general(self, use: Use, D: torch.Tensor, M: int) -> None:
        """Per-sample output gradients D (M, *output) of a use whose x is shared by the samples.

        g_i = Σ_p D_ip x_pᵀ: x is expanded over the samples (a view) and δ set per sample,
        so that :meth:`statistics` applies unchanged with the batch on axis 0.
        """
        x = use.x
        feat = x.shape[:-1] if x.is_floating_point() else x.shape
        use.x = x.unsqueeze(0).expand(M, *x.shape)
        use.delta = D.reshape(M, *feat, D.shape[-1])
        use.batch_axis = GENERAL_DONE

    # -- per-sample statistics ---------------------------------------------------------------
    @abc.abstractmethod
    def statistics(self, use: Use, u1: torch.Tensor, v1: torch.Tensor, split: bool, chunk_bytes: int,
                   with_sum_g: bool = True):
        """:class:`~sdelip.engines.LayerStatistics` of g_i (of ℓ_i as the hooks see it) for one use.

        ``u1``, ``v1`` are the top singular vectors of the rows ``use.rows`` of the weight
        matrix (all rows when None).
        """

    @abc.abstractmethod
    def per_sample_grads(self, use: Use, start: int, stop: int) -> torch.Tensor:
        """Per-sample gradients (c, m_rows, n) of samples start..stop−1 of one use (for summed uses)."""

    def scaled_projections(self, use: Use, S: torch.Tensor, u1: torch.Tensor, v1: torch.Tensor, M: int,
                           chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections of the preconditioned per-sample gradients of one use: (S ∘ g_i) v1 and (S ∘ g_i)ᵀ u1.

        ``S`` (m_rows, n) is the elementwise preconditioner and ``u1`` the top left singular
        vector, both restricted to the rows ``use.rows``; g_i as in :meth:`statistics` (of ℓ_i
        as the hooks see it). Returns (M, m_rows) and (M, n). The default forms the per-sample
        gradients a chunk of samples at a time (:meth:`per_sample_grads`, memory
        ``chunk_bytes``); rules whose :meth:`statistics` avoid them override it.
        """
        from ..core.statistics import scaled_projections

        m, n = S.shape
        c = int(max(1, min(M, chunk_bytes // max(1, 2 * m * n * u1.element_size()))))
        Gv = torch.empty(M, m, dtype=u1.dtype, device=u1.device)
        Gtu = torch.empty(M, n, dtype=u1.dtype, device=u1.device)
        for s in range(0, M, c):
            e = min(M, s + c)
            Gv[s:e], Gtu[s:e] = scaled_projections(self.per_sample_grads(use, s, e).to(u1.dtype), S, u1, v1)
        return Gv, Gtu

    def has_operator_norm_probe(self, module: nn.Module) -> bool:
        """Whether :meth:`operator_norm_probe` measures the exact operator norm of the module's linear map."""
        return False

    def operator_norm_probe(self, module: nn.Module, input_shape, init=None, generator=None):
        """The exact operator norm of the module on its input shape (:mod:`sdelip.tracking.probes`), or None."""
        return None

    def trajectory_projections(self, module: nn.Module, attr: str, x: torch.Tensor, delta: torch.Tensor,
                               u1: torch.Tensor, v1: torch.Tensor, chunk_bytes: int):
        """g_i v1 (c, M, m) and g_iᵀ u1 (c, M, n) for a chunk of c SDE trajectories (x, δ: (c, M, …), batch-first)."""
        Gv, Gtu = [], []
        for xj, dj, uj, vj in zip(x, delta, u1, v1):
            st = self.statistics(Use(self, module, attr, xj, None, delta=dj, batch_axis=0), uj, vj, False, chunk_bytes)
            Gv.append(st.Gv)
            Gtu.append(st.Gtu)
        return torch.stack(Gv), torch.stack(Gtu)


_REGISTRY: dict[type, LayerRule] = {}


def register_rule(*module_types: type) -> Callable[[type], type]:
    """Class decorator: register a :class:`LayerRule` for ``module_types`` (and their subclasses).

    The most specific registered type wins (``type(module).__mro__`` order), so a rule
    for a subclass overrides the rule of its base class.
    """
    if not module_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in module_types):
        raise TypeError(f"register_rule needs nn.Module subclasses, got {module_types!r}")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, LayerRule)):
            raise TypeError(f"register_rule decorates LayerRule subclasses, got {cls!r}")
        cls.module_types = tuple(module_types)
        rule = cls()
        for t in module_types:
            _REGISTRY[t] = rule
        return cls

    return deco


def rule_for(module: nn.Module) -> Optional[LayerRule]:
    """The registered rule of ``module``'s type (most specific base first), or None."""
    for t in type(module).__mro__:
        rule = _REGISTRY.get(t)
        if rule is not None:
            return rule
    return None


def registered_rules() -> dict[type, LayerRule]:
    """Module type → rule, for every registered rule."""
    return dict(_REGISTRY)


def claims(model: nn.Module) -> list[Claim]:
    """Every (module, weight) pair some rule tracks, in registration order.

    A rule that :meth:`~LayerRule.covers` a submodule (MultiheadAttention's ``out_proj``,
    which it applies functionally) takes that submodule's weights over.
    """
    covered: set[int] = set()
    out = []
    for path, mod in model.named_modules():
        if id(mod) in covered:
            continue
        rule = rule_for(mod)
        if rule is None:
            continue
        for sub in rule.covers(mod):
            covered.add(id(get_attr(mod, sub)))
        for attr in rule.weights(mod):
            out.append(Claim(path, mod, rule, attr))
    return out


def ambiguous(candidates: Iterable[int]) -> bool:
    return len(list(candidates)) > 1


def probe_batch_axis(delta: Optional[torch.Tensor], candidates: Sequence[int], sample: int) -> list[int]:
    """Candidate axes consistent with a probe gradient: δ of ℓ_sample alone is zero off ``sample`` on that axis.

    Args:
        delta: gradient of ℓ_sample alone with respect to the use's output (None: not reached).
        candidates: axes of the output that may carry the samples.
        sample: the sample whose loss was differentiated.

    Returns:
        the candidate axes a such that δ is non-zero only at index ``sample`` of axis a
        (empty when δ is zero: the probe says nothing).
    """
    if delta is None:
        return []
    nz = delta.detach() != 0
    if not bool(nz.any()):
        return []
    good = []
    for a in candidates:
        per_index = nz.movedim(a, 0).reshape(nz.shape[a], -1).any(1)
        if bool(per_index[sample]) and int(per_index.sum()) == 1:
            good.append(a)
    return good
