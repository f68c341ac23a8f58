"""The networks of the paper's experiments and their initialisation schemes.

* :class:`ConvNet` — the five-layer ConvNet of Appendix A, Table 1 (Sec 7, 8.3, 8.6, 8.7).
* :class:`MLP` — the three-layer MLP of Appendix A, Table 2 (Sec 8.4, 8.5).
* :func:`init_weights` — PyTorch default, Kaiming normal and scaled normal
  initialisation (Sec 8.2: the initial Lipschitz bound K(0) ≈ Π_ℓ s_ℓ (√m_ℓ + √n_ℓ)).
* :func:`build_model` — construct and initialise a model by name, deterministically
  from an initialisation seed (the "parameter initialization random seed" of Sec 8.7).

Both models are :class:`torch.nn.Sequential` subclasses with named children, so the
weight-carrying layers have readable module paths: ``features.conv1`` …
``classifier.fc2`` for the ConvNet and ``fc1``, ``fc2``, ``fc3`` for the MLP.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["ConvNet", "MLP", "init_weights", "build_model", "MODEL_NAMES", "INIT_SCHEMES"]

#: Names accepted by :func:`build_model`.
MODEL_NAMES = ("mlp", "convnet")
#: Schemes accepted by :func:`init_weights`.
INIT_SCHEMES = ("default", "kaiming", "normal")

GeneratorLike = Union[torch.Generator, int, None]


class ConvNet(nn.Sequential):
    """The five-layer ConvNet of Appendix A, Table 1.

    Layer by layer (the paper's layer numbers in brackets; ``(*)`` layers are switched
    on by ``dropout`` / ``batchnorm``)::

        features.conv1    Conv2d(in_channels, 32, 3, padding=1)        [1]
        features.relu1    ReLU                                         [2]
        features.pool1    MaxPool2d(2, 2)                              [3]
        features.conv2    Conv2d(32, 64, 3, padding=1)                 [4]
        features.drop2    Dropout(0.2)                           (*)   [5]
        features.relu2    ReLU                                         [6]
        features.pool2    MaxPool2d(2, 2)                              [7]
        features.conv3    Conv2d(64, 128, 3, padding=1, stride=2)      [8]
        features.drop3    Dropout(0.2)                           (*)   [9]
        features.bn3      BatchNorm2d(128, track_running_stats=False) (*) [10]
        features.relu3    ReLU                                         [11]
        classifier.flatten
        classifier.fc1    Linear(128*4*4, 256)                         [12]
        classifier.relu4  ReLU                                         [13]
        classifier.drop4  Dropout(0.3)                           (*)   [14]
        classifier.fc2    Linear(256, num_classes)                     [15]

    The five parameterised layers are conv1, conv2, conv3, fc1 and fc2. The spatial
    size is 32 → 16 → 8 → 4 for the paper's 32×32 CIFAR inputs; 28×28 inputs
    (MNIST, ``in_channels=1``) also end at 4×4 (28 → 14 → 7 → 4).

    Args:
        in_channels: input channels (3 for CIFAR).
        num_classes: output classes (10 for CIFAR-10, 100 for CIFAR-100).
        dropout: insert the Dropout layers 5, 9 and 14 of Table 1.
        batchnorm: insert BatchNorm layer 10 of Table 1 (batch statistics always,
            ``track_running_stats=False``, as in the paper).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, dropout: bool = False, batchnorm: bool = False):
        _check_int("in_channels", in_channels)
        _check_int("num_classes", num_classes)
        features: "OrderedDict[str, nn.Module]" = OrderedDict()
        features["conv1"] = nn.Conv2d(in_channels, 32, kernel_size=3, padding=1)
        features["relu1"] = nn.ReLU()
        features["pool1"] = nn.MaxPool2d(kernel_size=2, stride=2)
        features["conv2"] = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        if dropout:
            features["drop2"] = nn.Dropout(p=0.2)
        features["relu2"] = nn.ReLU()
        features["pool2"] = nn.MaxPool2d(kernel_size=2, stride=2)
        features["conv3"] = nn.Conv2d(64, 128, kernel_size=3, padding=1, stride=2)
        if dropout:
            features["drop3"] = nn.Dropout(p=0.2)
        if batchnorm:
            features["bn3"] = nn.BatchNorm2d(128, track_running_stats=False)
        features["relu3"] = nn.ReLU()
        classifier: "OrderedDict[str, nn.Module]" = OrderedDict()
        classifier["flatten"] = nn.Flatten(start_dim=1)
        classifier["fc1"] = nn.Linear(128 * 4 * 4, 256)
        classifier["relu4"] = nn.ReLU()
        if dropout:
            classifier["drop4"] = nn.Dropout(p=0.3)
        classifier["fc2"] = nn.Linear(256, num_classes)
        super().__init__(OrderedDict(features=nn.Sequential(features), classifier=nn.Sequential(classifier)))
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.dropout = bool(dropout)
        self.batchnorm = bool(batchnorm)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, batchnorm={self.batchnorm}"


class MLP(nn.Sequential):
    """The MLP of Appendix A, Table 2: Linear–ReLU–Linear–ReLU–Linear.

    With the default ``sizes=(784, 512, 256, 10)`` the layers are ``fc1``
    Linear(784, 512), ``relu1``, ``fc2`` Linear(512, 256), ``relu2``, ``fc3``
    Linear(256, 10) — the three parameterised layers #1, #3, #5 of Table 2. A leading
    ``flatten`` module accepts inputs of shape (N, 1, 28, 28) as well as (N, 784).

    Args:
        sizes: layer widths, input first, number of classes last (at least two).
    """

    def __init__(self, sizes: Sequence[int] = (784, 512, 256, 10)):
        sizes = tuple(sizes)
        if len(sizes) < 2:
            raise ValueError(f"MLP sizes needs at least an input and an output size, got {sizes!r}")
        for i, s in enumerate(sizes):
            _check_int(f"sizes[{i}]", s)
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        layers["flatten"] = nn.Flatten(start_dim=1)
        n_linear = len(sizes) - 1
        for i in range(n_linear):
            layers[f"fc{i + 1}"] = nn.Linear(sizes[i], sizes[i + 1])
            if i < n_linear - 1:
                layers[f"relu{i + 1}"] = nn.ReLU()
        super().__init__(layers)
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - Sequential forward with a shape check
        n_in = self.sizes[0]
        if x.ndim < 2 or math.prod(x.shape[1:]) != n_in:
            raise ValueError(
                f"MLP expects inputs with {n_in} features per sample (e.g. (N, {n_in}) or (N, 1, 28, 28) "
                f"for 784), got shape {tuple(x.shape)}"
            )
        return super().forward(x)


def _check_int(arg: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be a positive integer, got {value!r}")


def _as_generator(generator: GeneratorLike) -> Optional[torch.Generator]:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def _weight_claims(model: nn.Module):
    """The weight matrices the layer rules name (:func:`sdelip.rules.claims`)."""
    from ..rules import claims

    return claims(model)


def _weight_modules(model: nn.Module):
    return list({id(c.module): c.module for c in _weight_claims(model)}.values())


def init_weights(
    model: nn.Module,
    scheme: str = "default",
    std: Optional[float] = None,
    generator: GeneratorLike = None,
) -> nn.Module:
    """Re-initialise the weight matrices of ``model`` that the layer rules name, in place (Sec 8.2).

    Schemes:

    * ``"default"``: PyTorch's ``reset_parameters`` (weights Kaiming-uniform with
      a = √5, i.e. U(−1/√n, 1/√n), s = 1/√(3n); biases U(−1/√n, 1/√n)).
    * ``"kaiming"``: weights N(0, s²) with s = √(2/n) (He et al., 2015), biases zero.
    * ``"normal"``: weights N(0, std²), biases zero.

    Here n is the fan-in: the column count of the weight matrix θ (``in_features`` for
    Linear, ``in_channels/groups · prod(kernel)`` for a convolution). Sec 8.2 predicts
    σ1 ≈ s (√m + √n) for each layer. Other modules (BatchNorm) are left untouched.

    Args:
        model: the network, modified in place.
        scheme: one of ``"default"``, ``"kaiming"``, ``"normal"``.
        std: the standard deviation for ``"normal"`` (required there, ignored otherwise).
        generator: a ``torch.Generator`` or an int seed making the result
            deterministic; ``None`` uses (and advances) the global RNG. With a generator
            the global RNG is not touched, for every scheme.

    Returns:
        ``model`` (for chaining).

    Raises:
        ValueError: unknown scheme, or ``std`` missing / not positive for ``"normal"``.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; valid schemes: {', '.join(INIT_SCHEMES)}")
    if scheme == "normal":
        if std is None:
            raise ValueError("init scheme 'normal' needs std (the N(0, std²) standard deviation), got None")
        if not (math.isfinite(float(std)) and float(std) > 0):
            raise ValueError(f"init std must be a positive finite number, got {std!r}")
    gen = _as_generator(generator)
    modules = _weight_modules(model)

    if scheme == "default":
        if gen is None:
            for m in modules:
                m.reset_parameters()
        else:
            # reset_parameters only draws from the global RNG: seed it from the generator
            # inside a forked RNG state so that the caller's global RNG is unchanged.
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for m in modules:
                    m.reset_parameters()
        return model

    with torch.no_grad():
        for c in _weight_claims(model):
            w = c.parameter
            if scheme == "kaiming":
                fan_in = c.rule.matrix(w).shape[1]
                s = math.sqrt(2.0 / fan_in)
            else:
                s = float(std)
            draw = torch.randn(w.shape, generator=gen, dtype=w.dtype) if gen is not None else torch.randn(
                w.shape, dtype=w.dtype
            )
            w.copy_(draw.mul_(s))
            owner, _, last = c.attr.rpartition(".")
            holder = c.module.get_submodule(owner) if owner else c.module
            bias = getattr(holder, last.replace("weight", "bias"), None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
    return model


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: Optional[int] = None,
    dropout: bool = False,
    batchnorm: bool = False,
    init: str = "default",
    init_std: Optional[float] = None,
    seed: int = 0,
    input_shape: Optional[Sequence[int]] = None,
) -> nn.Module:
    """Build a paper model by name and initialise it deterministically from ``seed``.

    Args:
        name: ``"mlp"`` (Table 2) or ``"convnet"`` (Table 1), case-insensitive.
        num_classes: output size.
        in_channels: input channels. ConvNet: default 3 (or ``input_shape[0]``). MLP:
            the input size is ``in_channels · 28 · 28`` (default 784) unless
            ``input_shape`` is given.
        dropout: ConvNet only — the (*) Dropout layers of Table 1.
        batchnorm: ConvNet only — the (*) BatchNorm layer of Table 1.
        init: ``"default"``, ``"kaiming"`` or ``"normal"`` (see :func:`init_weights`).
        init_std: standard deviation for ``init="normal"``.
        seed: the parameter-initialisation seed (Sec 8.7 keeps it separate from the
            mini-batch sampling seed of :func:`sdelip.workbench.data.make_loader`).
        input_shape: optional per-sample input shape, e.g. ``DatasetInfo.input_shape``;
            sets the MLP input size and the ConvNet input channels.

    Returns:
        The initialised model, in training mode.

    Raises:
        ValueError: unknown name (the message lists the valid names), or Dropout /
            BatchNorm requested for the MLP (Table 2 has neither).
    """
    key = str(name).strip().lower()
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if input_shape is not None:
        input_shape = tuple(int(s) for s in input_shape)
        if not input_shape:
            raise ValueError(f"input_shape must be non-empty, got {input_shape!r}")
    if key == "convnet":
        if in_channels is None:
            in_channels = input_shape[0] if input_shape is not None else 3
        elif input_shape is not None and input_shape[0] != in_channels:
            raise ValueError(f"in_channels={in_channels} contradicts input_shape={input_shape}")
        model: nn.Module = ConvNet(in_channels, num_classes, dropout=dropout, batchnorm=batchnorm)
    else:
        if dropout or batchnorm:
            raise ValueError(
                f"the MLP of Table 2 has no Dropout or BatchNorm layers (got dropout={dropout}, "
                f"batchnorm={batchnorm}); use model 'convnet' for those regularizers"
            )
        if input_shape is not None:
            n_in = math.prod(input_shape)
        else:
            n_in = (1 if in_channels is None else in_channels) * 28 * 28
        model = MLP((n_in, 512, 256, num_classes))
    init_weights(model, init, std=init_std, generator=torch.Generator().manual_seed(int(seed)))
    return model
