"""What is read from a record: the Thm 16–17 prediction of K(t) and the figures.

``prediction`` (observed K(t) against the Thm 16 path and the Thm 17 mean ± sd) and
``plotting`` (figures of records, predictions and simulations).

May import: :mod:`sdelip.core`, :mod:`sdelip.record`; never the tracker or the SDE systems.
"""

from .prediction import predict

__all__ = ["predict"]
