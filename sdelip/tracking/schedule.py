"""Which SGD steps the tracker measures (a *track schedule*).

The dynamics terms of Thm 14–15 are computed at the parameters before update k on
step k's mini-batch. Measuring them every step is the default; long runs can measure
every N-th step or on a logarithmic grid that is dense early (where K(t) moves fastest,
Fig 2's insets) and sparse later. :func:`sdelip.analysis.prediction.predict` integrates a sparse
record over the actual spacing of the tracked steps (coefficients held piecewise
constant until the next tracked step).

A schedule is any callable ``schedule(step) -> bool``; the classes here add a
:meth:`Schedule.describe` string stored in the record's metadata.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Union

__all__ = ["Schedule", "EveryStep", "EveryN", "LogSchedule", "StepList", "CallableSchedule", "as_schedule"]


class Schedule:
    """Base class: ``schedule(step)`` is True when step ``step`` (0-based) is tracked."""

    def __call__(self, step: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        """A short, stable description stored in the record metadata."""
        return type(self).__name__

    def steps(self, n: int) -> list[int]:
        """The tracked steps among 0..n-1."""
        return [k for k in range(n) if self(k)]

    def __repr__(self) -> str:
        return self.describe()


class EveryStep(Schedule):
    """Track every step (the default)."""

    def __call__(self, step: int) -> bool:
        return True

    def describe(self) -> str:
        return "every step"


class EveryN(Schedule):
    """Track steps ``offset, offset + n, offset + 2n, …``.

    Args:
        n: the spacing, a positive integer.
        offset: the first tracked step (default 0).
    """

    def __init__(self, n: int, offset: int = 0):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the track schedule spacing must be a positive integer, got {n!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"the track schedule offset must be a non-negative integer, got {offset!r}")
        self.n = n
        self.offset = offset

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.n == 0

    def describe(self) -> str:
        return f"every {self.n} steps" + (f" from step {self.offset}" if self.offset else "")


class LogSchedule(Schedule):
    """Logarithmically spaced steps: 0, every step below ``dense``, then ⌊b^j⌋, b = 10^(1/per_decade).

    With the defaults (``per_decade=10``, ``dense=10``) the tracked steps are
    0, 1, …, 9, 10, 12, 15, 19, 25, 31, 39, 50, 63, 79, 100, 125, … — about
    ``per_decade`` steps per factor of ten, so a 39,000-step run is tracked
    about 55 times.

    Args:
        per_decade: tracked steps per decade (positive integer).
        dense: every step below this one is tracked.
    """

    def __init__(self, per_decade: int = 10, dense: int = 10):
        if isinstance(per_decade, bool) or not isinstance(per_decade, int) or per_decade < 1:
            raise ValueError(f"per_decade must be a positive integer, got {per_decade!r}")
        if isinstance(dense, bool) or not isinstance(dense, int) or dense < 0:
            raise ValueError(f"dense must be a non-negative integer, got {dense!r}")
        self.per_decade = per_decade
        self.dense = dense
        self._base = 10.0 ** (1.0 / per_decade)
        self._grid: set[int] = set()
        self._j = 0  # next exponent to generate
        self._upto = -1  # all grid points <= _upto are in _grid

    def _extend(self, step: int) -> None:
        while self._upto < step:
            # the epsilon guards against 10**(j/r) landing a hair below an exact integer.
            value = 10.0 ** (self._j / self.per_decade)
            point = int(math.floor(value + 1e-9))
            self._grid.add(point)
            self._upto = point
            self._j += 1

    def __call__(self, step: int) -> bool:
        if step < self.dense or step == 0:
            return True
        self._extend(step)
        return step in self._grid

    def describe(self) -> str:
        return f"log ({self.per_decade} per decade, every step below {self.dense})"


class StepList(Schedule):
    """Track exactly the given steps."""

    def __init__(self, steps: Iterable[int]):
        self._steps = frozenset(int(s) for s in steps)
        if any(s < 0 for s in self._steps):
            raise ValueError("tracked steps must be non-negative")

    def __call__(self, step: int) -> bool:
        return step in self._steps

    def describe(self) -> str:
        s = sorted(self._steps)
        head = ", ".join(map(str, s[:8])) + (", …" if len(s) > 8 else "")
        return f"steps [{head}] ({len(s)} steps)"


class CallableSchedule(Schedule):
    """Wrap a user callable ``f(step) -> bool``."""

    def __init__(self, fn: Callable[[int], bool]):
        self.fn = fn

    def __call__(self, step: int) -> bool:
        return bool(self.fn(step))

    def describe(self) -> str:
        return f"callable {getattr(self.fn, '__name__', repr(self.fn))}"


ScheduleLike = Union[None, int, str, Schedule, Callable[[int], bool], Iterable[int]]


def as_schedule(spec: ScheduleLike) -> Schedule:
    """Turn a user specification into a :class:`Schedule`.

    Args:
        spec: ``None`` or ``1`` (every step), an int N (every N steps), ``"log"``
            (:class:`LogSchedule`), ``"every"``, a :class:`Schedule`, a callable
            ``step -> bool``, or an iterable of step numbers.
    """
    if spec is None:
        return EveryStep()
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, bool):
        raise TypeError(f"schedule must be an int, 'log', a Schedule or a callable, got {spec!r}")
    if isinstance(spec, int):
        return EveryStep() if spec == 1 else EveryN(spec)
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "log":
            return LogSchedule()
        if key in ("every", "every step", "all"):
            return EveryStep()
        raise ValueError(f"unknown schedule {spec!r}; use an int N (every N steps), 'log', or a Schedule")
    if callable(spec):
        return CallableSchedule(spec)
    try:
        return StepList(spec)
    except TypeError:
        raise TypeError(f"schedule must be an int, 'log', a Schedule, a callable or steps, got {type(spec).__name__}")
