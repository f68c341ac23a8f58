"""nn.MultiheadAttention: the Q/K/V projections and the output projection, applied functionally.

``nn.MultiheadAttention`` (and so every ``nn.TransformerEncoderLayer`` / ``DecoderLayer``)
never calls a submodule: ``F.multi_head_attention_forward`` applies ``in_proj_weight``
(or ``q/k/v_proj_weight`` when kdim/vdim differ from the embedding dimension) and
``out_proj.weight`` with ``F.linear``, on slices of the packed weight where query, key and
value differ. The rule tracks

- ``in_proj_weight`` (3E × E, the stacked W_q; W_k; W_v) as one layer named
  ``<path>.in_proj_weight``, or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``
  as three layers;
- ``out_proj.weight`` (E × E) as the layer ``<path>.out_proj``.

During a tracked forward of the module, the calls of ``torch.nn.functional.linear`` are
watched (the name is rebound for the duration of that module's forward only, and only
when the tracker captures the step): a call whose weight is a watched weight, or a row
slice of it, is reported as a linear use of those rows, with its input and output. Each
use is then an ordinary linear map of the factored engine (:mod:`sdelip.rules.linear`):
g_i = Σ_p δ_ip x_ipᵀ on its rows. Inside the function the activations are sequence-first,
(L, N, E); the output projection's input is the flattened (L·N, E), which the rule views
as (L, N, E). Dropout on the attention weights needs no care: the hooks see the very
forward pass whose masks produced the loss.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..core.statistics import EngineError
from .base import Use, get_attr, register_rule
from .linear import LinearUses

__all__ = ["MultiheadAttentionRule", "vmap_safe_attention"]


class _LinearWatch:
    """Rebinds ``torch.nn.functional.linear`` while at least one watched module's forward runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active: list[dict] = []  # stack of watch entries of the forwards in progress
        self._original = None

    def push(self, entry: dict) -> None:
        with self._lock:
            if not self._active:
                self._original = F.linear
                F.linear = self._linear
            self._active.append(entry)

    def pop(self, entry: dict) -> None:
        with self._lock:
            if entry in self._active:
                self._active.remove(entry)
            if not self._active and self._original is not None:
                F.linear = self._original
                self._original = None

    def _linear(self, input, weight, bias=None):
        out = self._original(input, weight, bias)
        for entry in reversed(self._active):
            hit = _match(entry["weights"], weight)
            if hit is not None:
                attr, rows = hit
                entry["report"](entry, attr, input, out, rows)
                break
        return out


def _match(weights: dict, w: torch.Tensor):
    """(attr, rows) when w is a watched weight or a row slice of one, else None."""
    for attr, p in weights.items():
        if w is p:
            return attr, None
        base = w._base
        if base is not None and base is p and w.ndim == 2 and w.stride() == p.stride():
            r0 = (w.storage_offset() - p.storage_offset()) // p.stride(0)
            return attr, slice(r0, r0 + w.shape[0])
    return None


_WATCH = _LinearWatch()


def _attention_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention written out, with out-of-place dropout (vmap draws per-sample masks)."""
    L, S = query.shape[-2], key.shape[-2]
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    s = (1.0 / query.shape[-1] ** 0.5) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * s
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = torch.softmax(scores, -1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, training=True)
    return weights @ value


class vmap_safe_attention:
    """Context: attention dropout that ``vmap(randomness="different")`` can draw per sample.

    ``F.scaled_dot_product_attention`` draws its dropout mask in place, which vmap refuses
    for one sample's unbatched tensors, and its fused CPU kernels have no batching rule
    (vmap falls back to a slow loop); inside this context it is computed by the same
    formula written out, with an out-of-place ``F.dropout`` (the SDE systems evaluate
    per-sample losses this way, :mod:`sdelip.sde`).
    """

    _depth = 0
    _original = None
    _lock = threading.Lock()

    def __enter__(self):
        cls = type(self)
        with cls._lock:
            if cls._depth == 0:
                cls._original = F.scaled_dot_product_attention
                F.scaled_dot_product_attention = cls._sdpa
            cls._depth += 1
        return self

    def __exit__(self, *exc):
        cls = type(self)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                F.scaled_dot_product_attention = cls._original
        return False

    @staticmethod
    def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _attention_math(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(LinearUses):
    """Tracks ``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj.weight`` of nn.MultiheadAttention."""

    name = "attention"

    def weights(self, module: nn.MultiheadAttention) -> list[str]:
        if module._qkv_same_embed_dim:
            names = ["in_proj_weight"]
        else:
            names = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return [n for n in names if isinstance(getattr(module, n, None), torch.Tensor)] + ["out_proj.weight"]

    def covers(self, module) -> list[str]:
        return ["out_proj"]

    def attach(self, module, attrs_, sink) -> list:
        weights = {a: get_attr(module, a) for a in attrs_}

        def pre(mod, args, kwargs):
            if not sink.capturing or not torch.is_grad_enabled():
                return None
            query = args[0] if args else kwargs.get("query")
            if not isinstance(query, torch.Tensor):
                return None
            if query.ndim != 3:
                raise EngineError(
                    f"{sink.name_of(mod)!r} (MultiheadAttention) was called on an unbatched query of shape "
                    f"{tuple(query.shape)}; the tracker needs the samples of the step in one batched call"
                )
            L = query.shape[1] if mod.batch_first else query.shape[0]
            N = query.shape[0] if mod.batch_first else query.shape[1]
            entry = {"module": mod, "weights": weights, "L": L, "N": N, "report": self._reporter(sink)}
            mod.__dict__["_sdelip_watch"] = entry
            _WATCH.push(entry)
            return None

        def post(mod, args, kwargs, output):
            entry = mod.__dict__.pop("_sdelip_watch", None)
            if entry is not None:
                _WATCH.pop(entry)
            return None

        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(post, with_kwargs=True, always_call=True)]

    def _reporter(self, sink):
        def report(entry, attr, x, out, rows):
            L, N = entry["L"], entry["N"]
            if x.ndim == 2 and x.shape[0] == L * N:  # the output projection's flattened (L·N, E) input
                x = x.view(L, N, x.shape[-1])
                extra = {"view": (L, N)}
            else:
                extra = None
            sink.report(Use(self, entry["module"], attr, x, out, rows=rows, extra=extra))
        return report

    def delta_view(self, use: Use, delta: torch.Tensor) -> torch.Tensor:
        if use.extra and "view" in use.extra:
            L, N = use.extra["view"]
            return delta.view(L, N, delta.shape[-1])
        return delta

