"""Every code block of docs/integrations.md runs as written (each in a fresh folder, in a subprocess)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integrations.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_the_page_has_the_four_examples():
    text = DOC.read_text()
    assert len(blocks()) == 4
    for heading in ("## Lightning", "## Hugging Face models", "## The Hugging Face Trainer", "## DDP"):
        assert heading in text


def _needs(code):
    for mod in ("lightning", "transformers"):
        if f"import {mod}" in code or f"integrations.{mod}" in code:
            pytest.importorskip(mod, reason=f"{mod} is not installed (pip install 'sdelip[integrations]')")
    if "transformers" in code:
        pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(4))
def test_block_runs(tmp_path, index):
    code = blocks()[index]
    _needs(code)
    script = tmp_path / "train_ddp.py" if "torchrun" in code else tmp_path / "example.py"
    script.write_text(code)
    if "torchrun" in code:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script.name]
    else:
        cmd = [sys.executable, script.name]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "K" in proc.stdout
