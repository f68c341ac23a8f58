"""Every ``python`` block of the README and of docs/*.md runs as written (issue 29).

Each block is run alone, in a fresh interpreter, in an empty folder (what it reads it must make
itself: the bundled digits of :mod:`sdelip.workbench.data`, its own small run and record). Each
block states its cost on the 2-core development machine on its first line,
``# cost: about N s on this 2-core CPU`` (or ``N min``); blocks of 10 s or more are marked slow.
Blocks that are not meant to run (signatures, file layouts) use another fence (``text``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# docs/integrations.md's blocks (Lightning, the HF Trainer, DDP) are run by tests/integrations/test_docs_integrations.py
FILES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "integrations.md")]
COST = re.compile(r"^# cost: about (\d+(?:\.\d+)?) (s|min) on this 2-core CPU")


def python_blocks():
    """(file, line, cost in s, code) of every ```python block."""
    out = []
    for path in FILES:
        lines = path.read_text().splitlines()
        k = 0
        while k < len(lines):
            if lines[k].strip() == "```python":
                start = k + 1
                k += 1
                while lines[k].strip() != "```":
                    k += 1
                code = "\n".join(lines[start:k]) + "\n"
                m = COST.match(lines[start]) if start < k else None
                cost = None if m is None else float(m.group(1)) * (60 if m.group(2) == "min" else 1)
                out.append((path.relative_to(ROOT).as_posix(), start, cost, code))
            k += 1
    return out


BLOCKS = python_blocks()


def _param(block):
    name, line, cost, _ = block
    marks = [pytest.mark.slow] if cost is None or cost >= 10 else []
    return pytest.param(block, id=f"{name}:{line}", marks=marks)


def test_blocks_are_found_and_state_their_cost():
    assert len(BLOCKS) >= 10 and {b[0] for b in BLOCKS} >= {"README.md", "docs/tracking.md", "docs/sde.md"}
    missing = [f"{name}:{line}" for name, line, cost, _ in BLOCKS if cost is None]
    assert not missing, f"blocks without a '# cost: about N s on this 2-core CPU' first line: {missing}"


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_block_runs_as_written(block, tmp_path):
    name, line, cost, code = block
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=max(120.0, 10 * (cost or 60)))
    assert proc.returncode == 0, f"{name}:{line} failed:\n{proc.stderr[-3000:]}"
