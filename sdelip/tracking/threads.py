"""How many CPU threads a run uses: an explicit choice, or a default that degrades gracefully under load.

PyTorch's default is one intra-op thread per core. On a machine whose cores are busy
with other jobs that collapses: the OpenMP threads of each small matrix product wait for
one another while the other jobs hold the cores (docs/performance.md, "Threads", has
the timings). The default here
(:func:`default_threads`) uses only the cores that are idle when the run starts — the
cores not accounted for by the 1-minute load average — and at least one; an explicit
``OMP_NUM_THREADS`` (or ``--threads`` / ``TrainConfig.threads``) always wins.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

__all__ = ["default_threads", "use_threads", "resolve_threads"]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(load: Optional[float] = None, cores: Optional[int] = None) -> int:
    """Threads for a run on this machine now: the idle cores (at least 1, at most torch's default).

    Args:
        load: the 1-minute load average (default: ``os.getloadavg()``).
        cores: the cores this process may run on (default: its CPU affinity).

    ``OMP_NUM_THREADS``, when set, is returned as is.
    """
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.strip().isdigit() and int(env) > 0:
        return int(env)
    cores = _cores() if cores is None else int(cores)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - no load average
            load = 0.0
    idle = int(cores - load + 0.5)
    return max(1, min(cores, torch.get_num_threads(), idle))


def resolve_threads(threads: Optional[int]) -> int:
    """``threads`` checked (a positive int), or :func:`default_threads` for None."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None (automatic), got {threads!r}")
    return threads


@contextlib.contextmanager
def use_threads(threads: Optional[int]) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(resolve_threads(threads))``; restores the old setting."""
    n = resolve_threads(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)
