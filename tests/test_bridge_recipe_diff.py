"""bench/bridge_recipe_diff.py (issue 15): our 1B GPU configuration vs Bridge's own H100 recipe."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

DOC = REPO / "docs" / "bridge_recipe_diff.md"


def test_the_diff_lists_what_we_chose_and_not_what_we_adopted(tmp_path):
    out = tmp_path / "diff.json"
    proc = subprocess.run([sys.executable, "bench/bridge_recipe_diff.py", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = json.loads(out.read_text())
    assert set(diff) == {"model", "ddp", "optimizer", "env_vars"}
    # Deliberate differences are listed, with both values.
    assert diff["model"]["cross_entropy_fusion_impl"] == ["native", "te"]
    assert diff["optimizer"]["lr"] == [1.5e-4, 3e-4]
    # Adopted from Bridge's recipe (recipes/pretrain_llama32_1b.yaml): no longer differs.
    assert diff["env_vars"] == {} and diff["ddp"] == {}
    # Architecture and layer spec come from the same local config on both sides: never a difference.
    for field in ("vocab_size", "num_layers", "hidden_size", "transformer_layer_spec", "seq_length"):
        assert field not in diff["model"], field
    assert "cross_entropy_fusion_impl" in proc.stdout and "bridge h100" in proc.stdout
    # Every difference is explained in the doc (a new one after an upgrade fails here until it is).
    doc = DOC.read_text()
    unexplained = [f"{s}.{f}" for s, fields in diff.items() for f in fields if f"`{s}.{f}`" not in doc]
    assert not unexplained, f"explain these in {DOC.name}: {unexplained}"


def test_bad_arguments_fail_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "bench/bridge_recipe_diff.py", "--hf-model", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has no config.json" in proc.stderr and "Traceback" not in proc.stderr
