"""Layer rules in one registry: which weight matrices a module holds and their per-sample statistics.

One module per layer family, each registering its rule with :func:`register_rule`:

==================  =========================================  =======================================
module              rule                                       weight matrices θ^(ℓ)
==================  =========================================  =======================================
``linear``          :class:`~sdelip.rules.linear.LinearRule`   nn.Linear on any leading axes
``conv``            :class:`~sdelip.rules.conv.ConvRule`       nn.Conv1d/2d/3d (stride, dilation,
                                                               padding, groups, depthwise)
``embedding``       :class:`~sdelip.rules.embedding.           nn.Embedding (padding_idx; sparse
                    EmbeddingRule`                             per-sample gradients)
``attention``       :class:`~sdelip.rules.attention.           nn.MultiheadAttention: in_proj_weight
                    MultiheadAttentionRule`                    (or q/k/v_proj_weight), out_proj
``recurrent``       :class:`~sdelip.rules.recurrent.           nn.RNN/LSTM/GRU: every weight matrix,
                    RecurrentRule`                             per sample (the samples' axes known)
``fallback``        :data:`~sdelip.rules.fallback.FALLBACK`    any other weight matrix: exact
                                                               per-sample gradients of its module
``broadcast``       :data:`~sdelip.rules.broadcast.            a shared tensor broadcast over the
                    PARAMETER_USE`                             samples (positions on arange(T), a
                                                               class token): δ_i from the consumer
==================  =========================================  =======================================

Adding a layer type is one new module here (a :class:`LayerRule` subclass decorated with
``@register_rule(MyModule)``; every module of this package is imported, so nothing else
changes) and its oracle test (docs/tracking.md, "Adding a layer type"). A rule defined
in user code registers the same way.
"""

import importlib
import pkgutil

from .base import (
    BatchAxisError,
    Claim,
    LayerRule,
    RuleError,
    Use,
    claims,
    probe_batch_axis,
    register_rule,
    registered_rules,
    rule_for,
)
from .fallback import FALLBACK, FallbackRule

for _info in pkgutil.iter_modules(__path__):  # every rule module registers itself on import
    importlib.import_module(f"{__name__}.{_info.name}")
del _info

__all__ = [
    "LayerRule",
    "Use",
    "Claim",
    "RuleError",
    "BatchAxisError",
    "register_rule",
    "rule_for",
    "registered_rules",
    "claims",
    "probe_batch_axis",
    "FALLBACK",
    "FallbackRule",
]
