"""Old flat keyword arguments that now live on option objects: accepted for one release, with a warning."""

from __future__ import annotations

import warnings
from typing import Any, Mapping

__all__ = ["take_deprecated"]


def take_deprecated(owner: str, kwargs: Mapping[str, Any], table: Mapping[str, tuple],
                    groups: Mapping[str, str], stacklevel: int = 3) -> dict:
    """Sort the old flat keywords ``kwargs`` of ``owner`` into their option objects' fields.

    Args:
        owner: the callable as the message names it, e.g. ``"Tracker"``.
        kwargs: the keywords ``owner`` received beyond its signature.
        table: old keyword → (group, field) where it lives now.
        groups: group → how a caller spells it now, e.g. ``"options=TrackingOptions"``.

    Returns:
        {group: {field: value}} for the keywords given.

    Raises:
        TypeError: a keyword that ``owner`` never took (named).
    """
    out: dict = {}
    for key, value in kwargs.items():
        if key not in table:
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}")
        group, field = table[key]
        out.setdefault(group, {})[field] = value
        spelled = groups[group]
        now = f"{spelled}({field}=...)" if "(" not in spelled else spelled
        warnings.warn(f"{owner}({key}=...) is deprecated and will be removed in the next release: pass {now} "
                      "instead", DeprecationWarning, stacklevel=stacklevel)
    return out
