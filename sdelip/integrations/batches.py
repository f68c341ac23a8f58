"""Models that return a ``ModelOutput``/dict and loaders of dict batches, without importing transformers.

The framework-free half of :mod:`sdelip.integrations.huggingface` (see there): the
per-sample losses of a model output (:func:`per_sample_loss`) and the adapter of a model
and a loader of dict batches to the (inputs, targets) form of the SDE systems
(:func:`hf_model_and_data`), which :class:`~sdelip.sde.ParameterSDE` calls for a loader of
dict batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IntegrationError, PerSampleLossError

__all__ = ["per_sample_loss", "logits_of", "is_causal_lm", "HFModelAdapter", "hf_model_and_data", "is_dict_data",
           "adapt_dict_data"]


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output: a tensor, a ``ModelOutput``/dict with ``logits``, or a tuple's first entry."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        if "logits" in output.keys():
            return output["logits"]
        raise PerSampleLossError(f"the model's output has no 'logits' (keys {list(output.keys())}): pass a loss_fn "
                                 "that forms the per-sample losses from it")
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise PerSampleLossError(f"cannot find logits in a model output of type {type(output).__name__}")


def is_causal_lm(model: Optional[nn.Module]) -> bool:
    """Whether ``model`` predicts the next token (its labels are shifted by one)."""
    if model is None:
        return False
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    return name.endswith(("ForCausalLM", "LMHeadModel")) or bool(getattr(cfg, "is_decoder", False))


def _labels(batch) -> torch.Tensor:
    if isinstance(batch, Mapping):
        for key in ("labels", "label", "label_ids"):
            if key in batch:
                return batch[key]
        raise PerSampleLossError(f"the batch has no 'labels' (keys {sorted(batch)}): a Hugging Face batch carries "
                                 "its targets under 'labels'")
    if isinstance(batch, torch.Tensor):
        return batch
    raise PerSampleLossError(f"cannot find labels in a batch of type {type(batch).__name__}")


def per_sample_loss(output, batch, model: Optional[nn.Module] = None, *, causal: Optional[bool] = None,
                    weighting: str = "batch") -> torch.Tensor:
    """The (M,) per-sample losses of a Hugging Face model's output on a batch (module docstring).

    Args:
        output: the model's output (``ModelOutput``, dict, tuple or logits tensor).
        batch: the batch (a dict with ``labels``) or the labels tensor.
        model: the model (decides whether a token-level head is causal).
        causal: shift the labels of a token-level head by one (default: :func:`is_causal_lm`).
        weighting: ``"batch"`` (mean_i ℓ_i = the token-averaged loss of the batch) or
            ``"sample"`` (each sample's token mean).
    """
    if weighting not in ("batch", "sample"):
        raise ValueError(f"weighting must be 'batch' or 'sample', got {weighting!r}")
    logits, labels = logits_of(output), _labels(batch)
    if logits.ndim == 2:
        if logits.shape[-1] == 1 and labels.is_floating_point():
            return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
        if labels.is_floating_point() and labels.shape == logits.shape:  # multi-label
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(-1)
        return F.cross_entropy(logits, labels, reduction="none")
    if logits.ndim != 3:
        raise PerSampleLossError(f"logits of shape {tuple(logits.shape)}: expected (M, C) or (M, T, V)")
    if causal is None:
        causal = is_causal_lm(model)
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    M, T, V = logits.shape
    tok = F.cross_entropy(logits.reshape(M * T, V).float() if logits.dtype in (torch.float16, torch.bfloat16)
                          else logits.reshape(M * T, V), labels.reshape(M * T), ignore_index=-100,
                          reduction="none").reshape(M, T)
    valid = (labels != -100)
    counts = valid.sum(1).to(tok.dtype)
    total = tok.sum(1)
    if weighting == "sample":
        return total / counts.clamp_min(1)
    mean_count = counts.sum() / M
    if float(mean_count) == 0:
        raise PerSampleLossError("no labelled token in the batch (every label is -100)")
    return total / mean_count


# -------------------------------------------------------------------------------------------------
# the SDE: dict batches as (inputs, targets) tensors


def is_dict_data(loader) -> bool:
    """Whether a ``DataLoader`` yields dict batches (looks at its first batch)."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        return False
    ds = loader.dataset
    try:
        first = ds[0] if hasattr(ds, "__getitem__") else None
    except Exception:
        first = None
    if first is not None:
        return isinstance(first, Mapping)
    return isinstance(next(iter(loader)), Mapping)


class HFModelAdapter(nn.Module):
    """A model of dict batches as a model of one packed tensor: ``forward(x)`` → logits.

    ``x`` is (M, F, T…): the F integer fields of the batch (``fields``, e.g. ``input_ids``,
    ``attention_mask``) stacked on axis 1; the adapter unpacks them into keywords, calls
    the model and returns its logits. Its parameters are the model's (under ``model.``).
    """

    def __init__(self, model: nn.Module, fields):
        super().__init__()
        self.model = model
        self.fields = tuple(fields)

    def forward(self, x):
        kwargs = {f: x[:, k] for k, f in enumerate(self.fields)}
        return logits_of(self.model(**kwargs))


def _pack(batch: Mapping, fields, label_key):
    parts = []
    for f in fields:
        t = torch.as_tensor(batch[f])
        if t.is_floating_point():
            raise IntegrationError(f"the batch field {f!r} is floating point: the SDE adapter packs integer fields "
                                   "(token ids, masks) into one tensor; wrap the model yourself for other inputs")
        parts.append(t.long())
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise IntegrationError(f"the batch fields {list(fields)} have different shapes {sorted(shapes)}: pad them to "
                               "one length (e.g. DataCollatorWithPadding, padding='max_length')")
    return torch.stack(parts, 1), torch.as_tensor(batch[label_key])


def hf_model_and_data(model: nn.Module, loader, loss_fn: Optional[Callable] = None, *, causal: Optional[bool] = None):
    """(model, loader, loss_fn) in the (inputs, targets) form of the SDE systems, for a loader of dict batches.

    The inputs are the batch's integer fields other than the labels, stacked (:class:`HFModelAdapter`);
    the targets its ``labels``; ``loss_fn(logits, labels)`` is the mean of :func:`per_sample_loss`
    (with ``weighting="sample"``: the SDE's per-sample loss is that of the one-sample batch).
    An ``attention_mask`` of ones everywhere in the data is dropped (no padding: the same
    model); a padded one is kept, and the models whose forward tests the mask in Python
    (GPT-2, BERT with SDPA attention) are then refused by ``torch.func`` in the SDE's
    vectorised passes.
    A given ``loss_fn(output, batch)`` of the original model's output and dict batch is used instead,
    receiving the logits and ``{"labels": labels}``.
    """
    first = next(iter(loader))
    if not isinstance(first, Mapping):
        raise TypeError(f"the loader yields {type(first).__name__} batches, not dicts")
    label_key = next((k for k in ("labels", "label", "label_ids") if k in first), None)
    if label_key is None:
        raise PerSampleLossError(f"the batches have no 'labels' (keys {sorted(first)})")
    fields = [k for k in first if k != label_key and isinstance(first[k], torch.Tensor)]
    if "attention_mask" in fields and all(bool(b["attention_mask"].all()) for b in loader):
        # a mask of ones is no mask; dropped, because the models test it in Python (data-dependent control
        # flow, which torch.func.vmap refuses)
        fields.remove("attention_mask")
    adapter = HFModelAdapter(model, fields)
    collate = loader.collate_fn

    def packed_collate(items):
        return _pack(collate(items), fields, label_key)

    new_loader = torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False,
                                             collate_fn=packed_collate, drop_last=loader.drop_last)
    causal = is_causal_lm(model) if causal is None else causal
    if loss_fn is None:
        def loss_fn(logits, labels):
            return per_sample_loss(logits, labels, causal=causal, weighting="sample").mean()
    else:
        user = loss_fn

        def loss_fn(logits, labels):
            return user({"logits": logits}, {"labels": labels}).mean()
    return adapter, new_loader, loss_fn


def adapt_dict_data(model: nn.Module, loader, loss_fn: Optional[Callable] = None):
    """``(model, loader, loss_fn)`` unchanged, or through :func:`hf_model_and_data` for a loader of dict batches.

    Called by :class:`~sdelip.sde.ParameterSDE` (and so :class:`~sdelip.sde.LipschitzSDE`): with dict
    batches, the model is the :class:`HFModelAdapter` (its layers are named ``model.<path>``) and
    ``loss_fn``, if given, is ``loss_fn(output, batch)`` → (M,) per-sample losses.
    """
    if not is_dict_data(loader):
        return model, loader, loss_fn
    return hf_model_and_data(model, loader, loss_fn)
