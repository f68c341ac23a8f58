"""Live tracking of a training run: the tracker and its collaborators.

=====================  ======================================================================
module                 what it holds
=====================  ======================================================================
``tracker``            :class:`Tracker`, the orchestrator of one tracked step
``options``            the tracker's option objects (what shapes the record, the record, runtime)
``measurement``        decompositions → Thm 14 terms per layer → the record row
``optimizer_view``     what the tracker reads from the optimizer (η, weight decay, …)
``hooks``              the tracker's own forward hooks: inputs and the uses of each weight
``schedule``           which steps are measured
``safety``             continuation of a record, one backward per step, overflow
``checkpointing``      checkpoint, restore and resume of a tracker
``checkpoint``         the one checkpoint record (data only) shared with the workbench's train
``resume``             which options of a continued run changed
``metadata``           the run's metadata as written to its record
``probes``             probes of how loose the product bound K is (Prop 8–9)
``threads``            how many CPU threads a run uses
=====================  ======================================================================

May import: :mod:`sdelip.core`, :mod:`sdelip.rules`, :mod:`sdelip.engines`, :mod:`sdelip.record`.
"""

from .options import RecordOptions, RuntimeOptions, TrackingOptions
from .schedule import EveryN, EveryStep, LogSchedule
from .tracker import InputMismatchError, NotPlainSGDWarning, Tracker

__all__ = ["Tracker", "TrackingOptions", "RecordOptions", "RuntimeOptions", "InputMismatchError", "NotPlainSGDWarning", "EveryN", "EveryStep", "LogSchedule"]
