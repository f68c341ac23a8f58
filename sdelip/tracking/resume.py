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


def python_option(option: str, value: Any) -> str:
    """An option as a Python caller writes it, e.g. ``lr=0.01`` (a configuration object by its ``active()``)."""
    active = getattr(value, "active", None)
    if callable(active):
        value = active() or "none"
    return f"{option}={value!r}"


class ResumeError(ValueError):
    """A run cannot continue from its checkpoint and record as asked.

    Either the options differ from those of the run that wrote the checkpoint (or the
    record), or the record and the checkpoint do not belong together. The message names
    every differing option with both values; :meth:`describe` spells the options for
    another audience (the command line names its flags).

    Attributes:
        problem: what is wrong; ``{overwrite}`` and ``{checkpoint}`` stand for those options.
        changes: the :class:`OptionChange` list (empty when the options agree).
        source: ``"checkpoint"`` or ``"record"``: whose options ``changes`` compares with.

    Args:
        problem, changes, source: the attributes.
        spell: how the message spells an option and its value (default :func:`python_option`).
    """

    def __init__(self, problem: str, changes: Sequence[OptionChange] = (), source: str = "checkpoint",
                 spell: Callable[[str, Any], str] = None):
        self.problem = problem
        self.changes = list(changes)
        self.source = source
        super().__init__(self.describe(spell or python_option))

    def describe(self, spell: Callable[[str, Any], str] = python_option) -> str:
        """The message with options spelled by ``spell(option, value)``."""
        problem = self.problem.replace("{overwrite}", spell("overwrite", True))
        lines = [problem.replace("{checkpoint}", spell("checkpoint", "FILE"))]
        lines += [f"  {spell(c.option, c.requested)} now, {spell(c.option, c.checkpoint)} in the {self.source}"
                  for c in self.changes]
        if self.changes:
            lines.append(f"A resumed run continues the configuration of the run that wrote the {self.source}: rerun "
                         f"with its options, or pass {spell('overwrite', True)} to start a new run, which replaces the "
                         "record and the checkpoint.")
        return "\n".join(lines)


