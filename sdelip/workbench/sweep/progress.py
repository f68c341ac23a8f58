"""The progress line of a running sweep."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """Runs done / running / failed with an ETA: a tqdm bar on a TTY, else a line per finished task.

    Args:
        total: tasks to run (skipped ones excluded).
        workers: how many run at a time (for the "running" count); None when unknown.
        bar: use a tqdm bar (else one plain line per finished task).
        label: prefix of the lines.
        stream: where to write.
    """

    def __init__(self, total: int, workers: Optional[int], bar: bool, label: str = "sweep", stream=None):
        self.total, self.workers, self.label = total, workers, label
        self.done = self.failed = 0
        self.in_flight = 0
        self.start = time.perf_counter()
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        if bar and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=label, unit="task", file=self.stream, dynamic_ncols=True)
            self._refresh()

    @property
    def running(self) -> int:
        """Tasks running now (at most ``workers`` of those submitted)."""
        return self.in_flight if self.workers is None else min(self.in_flight, self.workers)

    def eta_seconds(self) -> Optional[float]:
        """Remaining time at the mean rate so far (None before the first finished task)."""
        finished = self.done + self.failed
        if finished == 0:
            return None
        return (time.perf_counter() - self.start) / finished * (self.total - finished)

    def submitted(self, n: int = 1) -> None:
        """``n`` tasks started (or were queued)."""
        self.in_flight += n
        self._refresh()

    def finished(self, name: str, ok: bool, seconds: float, error: str = "") -> None:
        """One task finished (``ok``) or failed."""
        self.in_flight -= 1
        if ok:
            self.done += 1
        else:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(1)
            self._refresh()
            if not ok:
                self._bar.write(f"[{self.label}] FAILED {name}: {error}", file=self.stream)
        else:
            self.stream.write(self.line(name, ok, seconds, error) + "\n")
            self.stream.flush()

    def line(self, name: str, ok: bool, seconds: float, error: str = "") -> str:
        """The plain line for a finished task."""
        eta = self.eta_seconds()
        status = "ok" if ok else f"FAILED ({error})"
        return (f"[{self.label}] {self.done + self.failed}/{self.total} {name}: {status} in {seconds:.1f} s; "
                f"done {self.done}, running {self.running}, failed {self.failed}, "
                f"ETA {_hms(eta) if eta is not None else '?'}")

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"running {self.running}, failed {self.failed}", refresh=True)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
