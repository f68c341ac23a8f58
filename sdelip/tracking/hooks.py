"""What the tracker watches in every forward pass: inputs, probe shapes and the uses of each weight.

:class:`ModuleMonitor` installs the tracker's own forward hooks (the engines install
theirs, :mod:`sdelip.engines`):

- an input check on the model (device and dtype of the data against the parameters'),
  raising :class:`InputMismatchError` at the forward pass;
- the input shape of every layer whose rule offers an exact operator-norm probe
  (:mod:`sdelip.tracking.probes`);
- whether the forward pass runs under ``torch.autocast`` and in which dtype (:attr:`ModuleMonitor.autocast`);
- the number of calls of every module applying a tracked weight in one forward pass with
  gradients enabled, against the counted uses (:attr:`sdelip.rules.inventory.TrackedLayer.calls`):
  a weight applied c times contributes σ1^c to K (Prop 8), so a different count raises
  :class:`~sdelip.engines.WeightUsesError` naming the module and the step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..engines import WeightUsesError
from ..errors import InputMismatchError  # noqa: F401  (defined there, re-exported)

__all__ = ["ModuleMonitor", "InputMismatchError"]


def _times(n: int) -> str:
    return f"{n} time" if n == 1 else f"{n} times"


class ModuleMonitor:
    """The tracker's forward hooks on the model.

    Args:
        model: the network.
        layers: its tracked layers.
        check_inputs: check every forward's inputs against the parameters' device and dtype.
        uses_counted: whether the layers' calls were counted by a forward pass of
            ``example_input`` (for the message).
        step: returns the current step, for messages.

    Attributes:
        input_shapes: layer name → the input shape (without the batch axis) of the last
            forward, for the layers with an operator-norm probe.
        ref_dtype, ref_device: the first tracked weight's dtype and device.
    """

    def __init__(self, model: nn.Module, layers: Sequence, check_inputs: bool, uses_counted: bool,
                 step: Callable[[], int]):
        self.model = model
        self.layers = list(layers)
        self.check_inputs = bool(check_inputs)
        self.uses_counted = bool(uses_counted)
        self._step = step
        self.input_shapes: dict[str, tuple] = {}
        self.calls: dict[str, int] = {}
        #: the autocast dtype of the last forward pass with gradients (``torch.autocast``), None without
        self.autocast = None
        ref = self.layers[0].weight
        self.ref_dtype, self.ref_device = ref.dtype, ref.device
        self._handles: list = []

    def attach(self) -> None:
        model = self.model
        if self.check_inputs:
            self._handles.append(model.register_forward_pre_hook(self._check_inputs_hook, with_kwargs=True))
        for layer in self.layers:
            if layer.rule.has_operator_norm_probe(layer.module):
                self._handles.append(layer.module.register_forward_hook(self._shape_hook(layer.name)))
        self._handles.append(model.register_forward_pre_hook(self._reset_calls))
        counted = {}
        for layer in self.layers:
            for mname, mod in zip(layer.module_names, layer.modules):
                counted.setdefault(mname, mod)
        for mname, mod in counted.items():
            self._handles.append(mod.register_forward_hook(self._count_call(mname)))
        self._handles.append(model.register_forward_hook(self._check_uses))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- hooks ------------------------------------------------------------------------------
    def _check_inputs_hook(self, module, args, kwargs):
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                if a.device != self.ref_device:
                    raise InputMismatchError(
                        f"the model's parameters are on {self.ref_device} but the input is on {a.device}; move the "
                        f"data with x.to({str(self.ref_device)!r}) (or the model with model.to(...))"
                    )
                if a.is_floating_point() and a.dtype != self.ref_dtype:
                    raise InputMismatchError(
                        f"the model's parameters are {self.ref_dtype} but the input is {a.dtype}; convert the data "
                        f"with x.to({self.ref_dtype}) (or the model with model.to({a.dtype}))"
                    )
                break
        return None

    def _shape_hook(self, name: str):
        def hook(module, inputs, output):
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].ndim >= 2:
                self.input_shapes[name] = tuple(inputs[0].shape[1:])
        return hook

    def _reset_calls(self, module, args) -> None:
        self.calls = {}
        if torch.is_grad_enabled():
            dev = self.ref_device.type
            self.autocast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None

    def _count_call(self, name: str):
        def hook(module, inputs, output):
            if torch.is_grad_enabled():
                self.calls[name] = self.calls.get(name, 0) + 1
        return hook

    def _check_uses(self, module, args, output) -> None:
        """Every tracked module called as often as the tracker counts (or not at all) in this forward pass."""
        if not torch.is_grad_enabled():
            return
        calls = self.calls
        for layer in self.layers:
            for mname, expected in zip(layer.module_names, layer.calls):
                n = calls.get(mname, 0)
                if n == 0 or n == expected:
                    continue
                who = f"layer {mname!r}" if mname == layer.name else \
                    f"module {mname!r} (which holds the weight of layer {layer.name!r})"
                how = "although the forward pass of example_input did not call it" if expected == 0 else \
                    "more than once" if n > expected else "fewer times than counted"
                why = ("as the forward pass of example_input did; the tracker needs the same structure in every "
                       "forward pass") if self.uses_counted else \
                    ("since without example_input= every module is taken to be called once: create the Tracker "
                     "with example_input= (one batch of inputs) so that a forward pass counts the uses of every weight")
                raise WeightUsesError(
                    f"{who} was called {how} ({_times(n)}) in one forward pass at step {self._step()}, but the "
                    f"tracker counts {_times(expected)}, {why}. A weight applied c times contributes σ1^c to the "
                    "product bound K (Prop 8), so its number of uses must be known"
                )
