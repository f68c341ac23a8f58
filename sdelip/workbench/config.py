"""The configuration and the result of a :func:`sdelip.workbench.train.train` run (Sec 8, Table 1–3)."""

from __future__ import annotations

from typing import Optional, Union

import attrs
import torch

from .._checks import check_device, check_one_of, check_positive_int, check_positive_number, check_tracked_batch_size
from .regularizers import RegularizerConfig, get_preset

__all__ = ["TrainConfig", "TrainResult"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _regularizer(value) -> RegularizerConfig:
    if isinstance(value, RegularizerConfig):
        return value
    if isinstance(value, str):
        return get_preset(value)
    if isinstance(value, dict):
        return RegularizerConfig(**value)
    raise TypeError(f"regularizer must be a preset name, a dict or a RegularizerConfig, got {type(value).__name__}")


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
        track_every: the tracker's schedule (int N or ``"log"``).
        engine: per-sample statistics engine (``"auto"``, ``"factored"``, ...).
        split: compute the Prop 6 variance/covariance split of κ.
        decomposition: ``"fast"`` (default: top eigenpairs and the resolvent of the
            smaller Gram matrix, falling back to the SVD on a degenerate spectrum), ``"svd"``
            or ``"gram"`` (see :class:`sdelip.tracking.tracker.Tracker`).
        probe_every: every N steps also record exact conv norms and an empirical
            lower bound of the Lipschitz constant (None: never).
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
    track_every: Union[int, str] = 1
    engine: str = "auto"
    split: bool = True
    decomposition: str = "fast"
    probe_every: Optional[int] = None
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
