"""One resume check: which options of a continued run differ from those of the run it continues.

Continuing a run (:func:`sdelip.workbench.train.train` from its checkpoint, :meth:`Tracker.resume
<sdelip.tracking.tracker.Tracker.resume>`, ``Tracker(start_step=k)`` on an existing record) is
allowed only with the options that shaped the run's numbers. :func:`option_changes`
compares them and returns one :class:`OptionChange` per difference; :class:`ResumeError`
names each with both values.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import attrs

from ..errors import ResumeError, python_option  # noqa: F401  (defined there, re-exported)

__all__ = ["OptionChange", "ResumeError", "option_changes", "python_option", "here_and_there"]


def option_changes(saved: Mapping[str, Any], now: Mapping[str, Any],
                   convert: Callable[[Any], Any] = lambda v: v) -> list:
    """The options of ``now`` whose value differs from ``saved`` (options ``saved`` lacks are not compared).

    Args:
        saved: the options of the run that wrote the checkpoint or the record.
        now: the options asked for now.
        convert: how a value of ``now`` is written to ``saved`` (e.g. to JSON metadata).
    """
    return [OptionChange(k, saved[k], v) for k, v in now.items() if k in saved and saved[k] != convert(v)]


def here_and_there(changes: Sequence["OptionChange"], source: str) -> list:
    """Each change as ``option=<now> here, option=<saved> in the <source>`` (the tracker's messages)."""
    return [f"{c.option}={c.requested!r} here, {c.option}={c.checkpoint!r} in the {source}" for c in changes]


@attrs.frozen
class OptionChange:
    """One option that differs between a checkpoint's run and the run asked for.

    Attributes:
        option: the option (a :class:`~sdelip.workbench.train.TrainConfig` field, a tracker option).
        checkpoint: its value in the run that wrote the checkpoint (or the record).
        requested: its value now.
    """

    option: str
    checkpoint: Any
    requested: Any
