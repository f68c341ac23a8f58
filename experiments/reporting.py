"""Summary tables and JSON of the experiment scripts: CSV and Markdown side by side."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

__all__ = ["write_table", "write_json"]


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def write_table(rows: Sequence[Mapping], out: Path, stem: str = "summary", title: Optional[str] = None,
                notes: Iterable[str] = ()) -> tuple[Path, Path]:
    """Write rows as ``<stem>.csv`` and ``<stem>.md`` (a Markdown table plus notes)."""
    out = Path(out)
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    csv_path = out / f"{stem}.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    md = []
    if title:
        md += [f"## {title}", ""]
    md.append("| " + " | ".join(cols) + " |")
    md.append("|" + "---|" * len(cols))
    for r in rows:
        md.append("| " + " | ".join(_fmt(r.get(k, "")) for k in cols) + " |")
    notes = list(notes)
    if notes:
        md.append("")
        md += [f"- {n}" for n in notes]
    md_path = out / f"{stem}.md"
    md_path.write_text("\n".join(md) + "\n")
    return csv_path, md_path


def write_json(obj, path: Path) -> Path:
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
    return Path(path)
