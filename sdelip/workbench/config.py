"""The configuration and the result of a :func:`sdelip.workbench.train.train` run (Sec 8, Table 1–3)."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Mapping, Optional

import attrs
import torch

from .._checks import check_device, check_one_of, check_positive_int, check_positive_number, check_tracked_batch_size
from ..tracking.options import TrackingOptions
from .regularizers import RegularizerConfig, get_preset

__all__ = ["TrainConfig", "TrainResult", "FLAT_TRACKING"]

#: TrackingOptions field → its name in the flat spelling of a :class:`TrainConfig`
#: (:meth:`TrainConfig.to_flat`: checkpoints, the record's ``config`` metadata, experiment
#: task configs, the ``sdelip track`` flags), in the order of the flat spelling.
FLAT_TRACKING = {"schedule": "track_every", "engine": "engine", "split": "split", "decomposition": "decomposition",
                 "gap_tol": "gap_tol", "on_degenerate": "on_degenerate", "probe_every": "probe_every"}

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _regularizer(value) -> RegularizerConfig:
    if isinstance(value, RegularizerConfig):
        return value
    if isinstance(value, str):
        return get_preset(value)
    if isinstance(value, dict):
        return RegularizerConfig(**value)
    raise TypeError(f"regularizer must be a preset name, a dict or a RegularizerConfig, got {type(value).__name__}")


def _tracking(value) -> TrackingOptions:
    if isinstance(value, TrackingOptions):
        return value
    if isinstance(value, Mapping):
        return TrackingOptions(**value)
    raise TypeError(f"tracking must be a TrackingOptions or a dict of its fields, got {type(value).__name__}")


def _positive_int(instance, attribute, value):
    check_positive_int(value, attribute.name)


@attrs.define
class TrainConfig:
    """Configuration of one training run (defaults: the paper's MLP on MNIST, Sec 8.4).

    Attributes:
        model: ``"mlp"`` (Table 2) or ``"convnet"`` (Table 1).
        dataset: ``"mnist"`` (falls back to the embedded digits), ``"mnist-embedded"``,
            ``"cifar10"``, ``"cifar100"`` or ``"cifar-standin"``.
        data_root: torchvision data folder.
        download: allow torchvision downloads.
        lr: learning rate η (also the SDE time step).
        batch_size: M, at least 2 (Prop 5).
        steps: number of SGD steps.
        init: ``"default"``, ``"kaiming"`` or ``"normal"`` (Sec 8.2).
        init_std: standard deviation for ``init="normal"``.
        init_seed: parameter-initialisation seed.
        sampling_seed: mini-batch sampling seed (and every other per-step draw).
        sampling: ``"reshuffle"`` (default: a seeded permutation per epoch, batches
            without replacement within it, as a DataLoader with ``shuffle=True``) or
            ``"iid"`` (every step draws M distinct samples independently of the other
            steps: the independent mini-batches that Def 4 models).
        regularizer: preset name, dict or :class:`RegularizerConfig`.
        track: attach the tracker.
        tracking: the tracker's :class:`~sdelip.tracking.options.TrackingOptions` (or a dict
            of its fields): engine, schedule (int N or ``"log"``; default every step), the
            Prop 6 split of κ, the decomposition route, gap tolerance and degenerate-σ1
            policy, the probe interval (every N steps also record exact conv norms and an
            empirical lower bound of the Lipschitz constant). Given to the tracker as is.
        record: path of the SQLite record (None: no record on disk).
        checkpoint: path of the checkpoint file (None: no checkpoints; ``sdelip track``
            defaults to ``<record>.ckpt``). An existing one is resumed: the run continues
            from its step with the same options (see :class:`ResumeError`), the record's
            rows from that step on (written after the checkpoint by a killed run) are
            replaced, and the run appends to the record. The file holds data only
            (:mod:`sdelip.tracking.checkpoint`).
        checkpoint_every: write the checkpoint every N steps (and at the start and the end).
            None (default): automatically, before the first step, at the end, and in
            between as often as keeps the measured time spent writing checkpoints under
            :data:`CHECKPOINT_BUDGET` (2.5 %) of the run's time, at most every
            :data:`CHECKPOINT_MIN_INTERVAL_S` seconds (the environment variable
            ``SDELIP_CHECKPOINT_MIN_INTERVAL_S`` overrides that minimum).
        max_train_samples: use a fixed random subset of N training samples (quick runs;
            drawn with seed 0, independent of the run's seeds, so every class appears).
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"`` or ``"float64"``.
        eval_test: evaluate test accuracy at the end.
        overwrite: start a new run: delete an existing record and checkpoint first.
        threads: torch CPU threads for the run; None (default): the idle cores when the
            run starts, at least 1 (:func:`sdelip.tracking.threads.default_threads`; an explicit
            ``OMP_NUM_THREADS`` wins).
    """

    model: str = "mlp"
    dataset: str = "mnist"
    data_root: Optional[str] = None
    download: bool = False
    lr: float = 0.01
    batch_size: int = attrs.field(default=128, validator=_positive_int)
    steps: int = attrs.field(default=300, validator=_positive_int)
    init: str = "default"
    init_std: Optional[float] = None
    init_seed: int = 0
    sampling_seed: int = 0
    sampling: str = attrs.field(default="reshuffle", validator=attrs.validators.in_(("reshuffle", "iid")))
    regularizer: RegularizerConfig = attrs.field(factory=RegularizerConfig, converter=_regularizer)
    track: bool = True
    tracking: TrackingOptions = attrs.field(factory=TrackingOptions, converter=_tracking)
    record: Optional[str] = None
    checkpoint: Optional[str] = None
    checkpoint_every: Optional[int] = None
    max_train_samples: Optional[int] = None
    device: str = "cpu"
    dtype: str = "float32"
    eval_test: bool = True
    overwrite: bool = False
    threads: Optional[int] = None

    def __attrs_post_init__(self):
        check_positive_number(self.lr, "lr")
        check_tracked_batch_size(self.batch_size, self.track)
        check_one_of(self.dtype, "dtype", tuple(_DTYPES))
        check_device(self.device)

    def to_flat(self) -> dict:
        """The configuration in its flat spelling: the fields, with ``tracking`` spelled out in place.

        The tracker's options go under their :data:`FLAT_TRACKING` names (``track_every``,
        ``engine``, ``split``, ``decomposition``, ``gap_tol``, ``on_degenerate``,
        ``probe_every``): the spelling of checkpoints, of the record's ``config`` metadata
        and of the experiments' task configs. :meth:`from_flat` reads it back.
        """
        out = {}
        for f in attrs.fields(TrainConfig):
            value = getattr(self, f.name)
            if f.name == "tracking":
                out.update({flat: getattr(value, field) for field, flat in FLAT_TRACKING.items()})
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "TrainConfig":
        """A configuration from its flat spelling (:meth:`to_flat`; keys it lacks keep their defaults)."""
        return cls(**_nest(flat))


def _nest(kwargs: Mapping[str, Any]) -> dict:
    """Keyword arguments with the flat tracker options (:data:`FLAT_TRACKING` names) moved into ``tracking``."""
    fields = {field: flat for field, flat in FLAT_TRACKING.items() if flat in kwargs}
    if not fields:
        return dict(kwargs)
    out = {k: v for k, v in kwargs.items() if k not in fields.values()}
    base = _tracking(out.get("tracking", TrackingOptions()))
    out["tracking"] = attrs.evolve(base, **{field: kwargs[flat] for field, flat in fields.items()})
    return out


_attrs_init = TrainConfig.__init__


@functools.wraps(_attrs_init)
def _init(self, *args, **kwargs):
    flat = [flat for flat in FLAT_TRACKING.values() if flat in kwargs]
    if flat:
        warnings.warn(f"TrainConfig({', '.join(k + '=...' for k in flat)}) is deprecated and will be removed in the "
                      "next release: pass tracking=TrackingOptions(...) (fields "
                      + ", ".join(f"{flat}→{field}" if flat != field else field for field, flat in FLAT_TRACKING.items()
                                  if flat in kwargs)
                      + "), or TrainConfig.from_flat(...) for the flat spelling", DeprecationWarning, stacklevel=2)
        kwargs = _nest(kwargs)
    _attrs_init(self, *args, **kwargs)


TrainConfig.__init__ = _init


@attrs.frozen
class TrainResult:
    """What a run produced.

    ``final_loss`` is the loss of the last step, ``train_accuracy`` the accuracy over every
    step's mini-batch, for the whole run also when it was resumed (``resumed_at``: the step
    this call started from, None for a run from step 0). ``checkpoints`` and
    ``checkpoint_seconds``: how many checkpoints this call wrote and the time it spent on
    them.
    """

    config: TrainConfig
    data: str
    data_source: str
    steps: int
    final_loss: float
    train_accuracy: float
    test_accuracy: Optional[float]
    K_initial: float
    K_final: float
    record: Optional[str]
    seconds: float
    model: torch.nn.Module = attrs.field(repr=False)
    resumed_at: Optional[int] = None
    checkpoints: int = 0
    checkpoint_seconds: float = 0.0
