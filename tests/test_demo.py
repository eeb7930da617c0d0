"""The README's main command (`make demo` -> python -m speechlm.demo) runs and learns."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_learns(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "speechlm.demo", "--workdir", str(work), "--iters", "16"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for stage in ("1/4", "2/4", "3/4", "4/4"):
        assert f"=== {stage}" in proc.stdout
    first, last = map(float, re.search(r"training loss ([0-9.]+) -> ([0-9.]+)", proc.stdout).groups())
    assert last < first - 2.0, proc.stdout[-2000:]
    assert (work / "tiny-llama32-speech" / "token_layout.json").is_file()
    assert (work / "data" / "blend.yaml").is_file()
    assert (work / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "16"
    assert "validation audio/synthetic at iteration 16" in proc.stdout
