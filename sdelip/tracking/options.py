"""The option objects of a :class:`~sdelip.tracking.tracker.Tracker` (small, frozen, comparable).

- :class:`TrackingOptions`: what the tracker measures and how: the options that shape a
  record. A continued run must keep them: the resume check (:meth:`Tracker.restore
  <sdelip.tracking.tracker.Tracker.restore>`, ``Tracker(start_step=k)`` on a record,
  :func:`sdelip.workbench.train.train`) compares exactly these fields, and
  :class:`~sdelip.workbench.config.TrainConfig` embeds one (``config.tracking``).
- :class:`RecordOptions`: where and how the record is written (path, mode, durability,
  the run metadata, an already held record lock): the writer option of the tracker.
- :class:`RuntimeOptions`: how the tracker runs (memory budget, threads, input checks,
  weights without a layer rule); not compared on resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import attrs

from .._checks import check_choice, check_optional_positive_int
from ..core.spectral import DEFAULT_GAP_TOL

__all__ = ["TrackingOptions", "RecordOptions", "RuntimeOptions"]


def _choice(*choices):
    def check(instance, attribute, value):
        check_choice(value, attribute.name, choices)

    return check


def _optional_positive_int(name: str):
    return lambda value: check_optional_positive_int(value, name)


@attrs.frozen
class TrackingOptions:
    """What the tracker measures and how: the options that shape a record (a resumed run keeps them).

    Attributes:
        engine: ``"auto"`` (coupled when a BatchNorm normalises with batch statistics,
            factored otherwise), ``"factored"``, ``"materialised"``, ``"coupled"`` (or an
            :class:`~sdelip.engines.Engine` class).
        schedule: which steps to track: 1 or None (every step), an int N (every N
            steps), ``"log"``, a :class:`~sdelip.tracking.schedule.Schedule`, a callable or
            an iterable of steps.
        split: also compute the Prop 6 variance/covariance split of κ.
        decomposition: how the operator-norm derivatives (Lemma 12–13) are evaluated:
            ``"auto"`` (``"amortised"`` for layers whose smaller dimension is at least
            :data:`sdelip.core.amortised.AUTO_MIN_DIM`, ``"fast"`` for the others; not the
            default: a run resumed from a checkpoint restarts the refinement from the exact
            route, so its record equals an uninterrupted run's only to the bound, not bit for
            bit, which the resume guarantee requires),
            ``"amortised"`` (the previous tracked step's eigenbasis refined by a
            warm-started block Davidson iteration, with an a posteriori error bound per
            layer and a fall-back to ``"fast"`` when it exceeds 1e-8,
            :mod:`sdelip.core.amortised`; the counts and the worst bound are in the
            tracker's metadata under ``"geometry"``), ``"fast"`` (the top two eigenpairs
            and the resolvent of the smaller
            Gram matrix, :mod:`sdelip.core.decompositions` — same numbers as the SVD route,
            several times cheaper on CPU; falls back to ``"svd"`` for a degenerate
            spectrum), ``"svd"`` (full thin SVD, :func:`sdelip.core.spectral.decompose`) or
            ``"gram"`` (full eigendecomposition of the smaller Gram matrix). The Gram
            routes square the condition number: in float32 expect relative errors of
            about 1e-7 / gap.
        gap_tol: relative gap (σ1 − σ2)/σ1 below which σ1 counts as degenerate.
        on_degenerate: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when σ1 is (nearly)
            repeated (Assumption 11); a degenerate layer is flagged in the record.
        probe_every: every this many steps, measure the exact operator norm of each Conv2d
            on its actual input shape and, with the tracker's ``probe_input``, an empirical
            lower bound of the network's Lipschitz constant (:mod:`sdelip.tracking.probes`).

    The resume check compares these fields, the engine by the name it resolves to and
    the schedule by its description (:meth:`compared`), and the uses of every weight.
    """

    engine: Union[str, type] = "auto"
    schedule: Union[None, int, str, Callable, Iterable] = 1
    split: bool = attrs.field(default=True, converter=bool)
    decomposition: str = attrs.field(default="fast", validator=_choice("auto", "amortised", "fast", "svd", "gram"))
    gap_tol: float = attrs.field(default=DEFAULT_GAP_TOL, converter=float)
    on_degenerate: str = attrs.field(default="warn", validator=_choice("warn", "raise", "ignore"))
    probe_every: Optional[int] = attrs.field(default=None, converter=_optional_positive_int("probe_every"))

    def compared(self, engine: str, schedule: str) -> dict:
        """The fields as the resume check compares them: ``engine`` and ``schedule`` as resolved by the tracker."""
        return {**attrs.asdict(self, recurse=False), "engine": engine, "schedule": schedule}


def _optional_path(value) -> Optional[Path]:
    return None if value is None else Path(value)


@attrs.frozen
class RecordOptions:
    """Where and how the tracker writes its record (the writer option).

    ``Tracker(model, opt, record="run.db")`` is ``record=RecordOptions("run.db")``.

    Attributes:
        path: the SQLite record (:mod:`sdelip.record`); None keeps the rows in memory
            (:attr:`Tracker.history <sdelip.tracking.tracker.Tracker.history>`).
        mode: ``"new"`` (default: refuse a record that already holds steps; with
            ``start_step`` > 0, continue the record after checking that it is this run's
            and dropping its rows from ``start_step`` on), ``"overwrite"`` (replace an
            existing record) or ``"append"`` (continue the record as it stands: the caller
            checks that it belongs to the run, as :meth:`Tracker.resume
            <sdelip.tracking.tracker.Tracker.resume>` does).
        durability: ``"process"`` or ``"power"`` (see :class:`~sdelip.record.RecordWriter`).
        metadata: extra run metadata merged into the record's (and into
            :attr:`Tracker.metadata <sdelip.tracking.tracker.Tracker.metadata>` without a record).
        seed: the run's seed, stored in the metadata (default: ``torch.initial_seed()``).
        lock: a :class:`~sdelip.record.lock.RecordLock` on ``path`` that the caller already
            holds and keeps (e.g. :func:`sdelip.workbench.train.train`, which writes a final
            checkpoint after the tracker closes); by default the writer takes the lock.
    """

    path: Optional[Path] = attrs.field(default=None, converter=_optional_path)
    mode: str = attrs.field(default="new", validator=_choice("new", "overwrite", "append"), kw_only=True)
    durability: str = attrs.field(default="process", validator=_choice("process", "power"), kw_only=True)
    metadata: Optional[Mapping[str, Any]] = attrs.field(default=None, kw_only=True)
    seed: Optional[int] = attrs.field(default=None, kw_only=True)
    lock: Any = attrs.field(default=None, eq=False, repr=False, kw_only=True)

    @classmethod
    def of(cls, record: Union[None, str, os.PathLike, "RecordOptions"]) -> "RecordOptions":
        """A tracker's ``record`` argument (None, a path or a :class:`RecordOptions`) as a :class:`RecordOptions`."""
        return record if isinstance(record, cls) else cls(record)


@attrs.frozen
class RuntimeOptions:
    """How the tracker runs; not compared when a run is continued.

    Attributes:
        chunk_bytes: memory budget of one chunk of per-sample intermediates (default: 8 MiB
            for the factored engine, 32 MiB for the vectorised ones).
        threads: torch threads for the tracker's own computations (decompositions and
            terms; the per-sample statistics run inside the backward with the training's
            threads). None keeps the current setting; 1 avoids the busy-waiting slowdowns
            of multi-threaded small linear algebra on a machine shared with other jobs.
        check_inputs: check on every forward that inputs match the model's device and dtype.
        unsupported: a trainable weight matrix without a layer rule is tracked exactly by
            the per-module fallback (``"fallback"``, per-sample gradients of that module
            alone by ``torch.func``) or refused at construction with its name
            (``"error"``, :class:`~sdelip.rules.inventory.UnsupportedLayerError`).
        loggers: live export of every written row (the terms of each tracked step) and of the
            run's metadata, e.g. ``[TensorBoardLogger("tb/run"), CSVLogger("run.csv")]``
            (:mod:`sdelip.loggers`: TensorBoard, CSV, W&B, MLflow, or any object with
            ``log_metadata``, ``log_row`` and ``close``); closed by :meth:`Tracker.close`.
    """

    chunk_bytes: Optional[int] = None
    threads: Optional[int] = attrs.field(default=None, converter=_optional_positive_int("threads"))
    check_inputs: bool = True
    unsupported: str = "fallback"
    loggers: tuple = attrs.field(default=(), converter=tuple)


#: The Tracker keywords that moved onto an option object: keyword → (argument, field).
DEPRECATED_TRACKER_KEYWORDS = {
    "split": ("options", "split"), "decomposition": ("options", "decomposition"), "gap_tol": ("options", "gap_tol"),
    "on_degenerate": ("options", "on_degenerate"), "probe_every": ("options", "probe_every"),
    "overwrite": ("record", "mode"), "durability": ("record", "durability"), "metadata": ("record", "metadata"),
    "seed": ("record", "seed"), "chunk_bytes": ("runtime", "chunk_bytes"), "threads": ("runtime", "threads"),
    "check_inputs": ("runtime", "check_inputs"), "unsupported": ("runtime", "unsupported"),
    "extra_noise_var": ("attribute", "extra_noise_var"),
}
_SPELLED = {"options": "options=TrackingOptions", "record": "record=RecordOptions", "runtime": "runtime=RuntimeOptions",
            "attribute": "tracker.extra_noise_var = ... after construction"}


def tracker_options(engine, schedule, options: Optional[TrackingOptions], record, runtime: Optional[RuntimeOptions],
                    deprecated: Mapping[str, Any]):
    """The Tracker's arguments as (TrackingOptions, RecordOptions, RuntimeOptions, extra_noise_var).

    ``engine`` and ``schedule`` (when not None) override the fields of ``options``; old flat
    keywords (``deprecated``) are mapped onto their objects with a DeprecationWarning.
    """
    from .._deprecation import take_deprecated

    moved = take_deprecated("Tracker", deprecated, DEPRECATED_TRACKER_KEYWORDS, _SPELLED, stacklevel=4)
    options = TrackingOptions() if options is None else options
    given = {k: v for k, v in (("engine", engine), ("schedule", schedule)) if v is not None}
    if given or "options" in moved:
        options = attrs.evolve(options, **{**moved.get("options", {}), **given})
    record = RecordOptions.of(record)
    if "record" in moved:
        fields = dict(moved["record"])
        if "mode" in fields:
            fields["mode"] = "overwrite" if fields["mode"] else record.mode
        record = attrs.evolve(record, **fields)
    runtime = RuntimeOptions() if runtime is None else runtime
    if "runtime" in moved:
        runtime = attrs.evolve(runtime, **moved["runtime"])
    extra_noise_var = float(moved.get("attribute", {}).get("extra_noise_var", 0.0))
    return options, record, runtime, extra_noise_var
