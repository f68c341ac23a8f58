"""Tables and output paths of the command line."""

from __future__ import annotations

import math
import sys
from pathlib import Path


def _print_table(rows, file=None):
    file = sys.stdout if file is None else file
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3e}"
    return "" if v is None else str(v)


def _markdown_table(rows) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _check_output(path) -> Path:
    """An output file's folder must exist and be writable: checked before any work is done."""
    import os

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise IsADirectoryError(f"the output {str(path)!r} is a directory; give a file name")
    if not folder.is_dir():
        raise FileNotFoundError(f"the folder {str(folder)!r} of the output {str(path)!r} does not exist; create it "
                                "first (sdelip does not create folders for output files)")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"the folder {str(folder)!r} of the output {str(path)!r} is not writable")
    return path

