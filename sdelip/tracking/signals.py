"""SIGTERM handled like SIGINT: the run stops cleanly, its record closed, and can be continued.

``kill`` (and batch schedulers, ``timeout``, ``docker stop``) send SIGTERM, whose default
action ends the process at once, as ``kill -9`` would: the record is left in WAL mode
and nothing is said. :func:`sigterm_as_interrupt` turns SIGTERM into :class:`Terminated`,
a :class:`KeyboardInterrupt`, so that the same ``finally`` blocks that make Ctrl-C clean
(the tracker closes its record, locks are released) run for it too.
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["Terminated", "sigterm_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (the message says what was kept and how to continue)."""


@contextlib.contextmanager
def sigterm_as_interrupt(message: str = "terminated by SIGTERM"):
    """Within the block, SIGTERM raises :class:`Terminated` (``message``) in the main thread.

    Does nothing outside the main thread, or when a SIGTERM handler other than the
    default is installed (the caller's own handling is kept).
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum, frame):
        raise Terminated(message)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
