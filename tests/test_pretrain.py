"""Pretraining recipe and entry point (issue 7): the checkpoint rules, dry runs and refusals.

The training runs of the pretraining recipes (2 processes, validation, checkpoints, SIGTERM and
resume) are the recipe matrix in tests/test_recipes.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from speechlm import checkpoints

pytestmark = pytest.mark.slow


def test_retention_rule_and_schedule():
    assert checkpoints.checkpoints_to_delete([5, 10, 15, 20, 25], keep_last=2, pinned={10}) == [5, 15]
    assert checkpoints.checkpoints_to_delete([5], keep_last=5, pinned=set()) == []
    schedule = [[30000, 5000], [None, 10000]]
    assert [checkpoints.save_interval_at(i, schedule) for i in (0, 25000, 29999, 30000, 90000)] == \
        [5000, 5000, 5000, 10000, 10000]


@pytest.fixture(scope="module")
def llama32_1b_shaped_dir(expanded_tiny_dir, tmp_path_factory):
    """The real Llama-3.2-1B architecture (config only, no weights) with the expanded tokenizer."""
    import shutil

    d = tmp_path_factory.mktemp("llama32-1b-config")
    config = json.loads((expanded_tiny_dir / "config.json").read_text())
    config.update(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64)
    (d / "config.json").write_text(json.dumps(config))
    for f in expanded_tiny_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("token_layout.json", "special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, d / f.name)
    return d


def _dry_run(*args):
    return subprocess.run([sys.executable, "-m", "speechlm.train", "--dry-run", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_dry_run_sizes_the_1b_recipe(llama32_1b_shaped_dir, synthetic_blend):
    proc = _dry_run("--config", "recipes/pretrain_llama32_1b.yaml", "--world-size", "16",
                    f"speechlm.hf_model={llama32_1b_shaped_dir}", f"speechlm.blend={synthetic_blend}",
                    "checkpoint.save=/tmp/unused", "speechlm.train_tokens=10000000000", "speechlm.from_scratch=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "ranks 16 = TP 1 x PP 1 x DP 16" in out
    assert "tokens per step 524,288" in out
    assert "steps 19,074 (warm-up 1,907)" in out  # ceil(1e10 / 524288), 10 %
    assert re.search(r"parameters \(B\)\s+1\.3[0-9]", out)  # 1.37 B with the 193,792-row tied embedding
    total = float(re.search(r"total\s+([0-9.]+)", out)[1])
    assert 10 < total < 80, out  # fits an 80 GB H100
    assert "audio/hi" in out and "epochs" in out


def test_a_recipe_that_cannot_work_fails_before_training(llama32_1b_shaped_dir, synthetic_blend):
    common = [f"speechlm.hf_model={llama32_1b_shaped_dir}", f"speechlm.blend={synthetic_blend}", "checkpoint.save=/tmp/x"]
    proc = _dry_run("--config", "recipes/pretrain_llama32_1b.yaml", "--world-size", "36",
                    "model.tensor_model_parallel_size=3", *common)
    assert proc.returncode != 0
    assert "global_batch_size=256 is not divisible" in proc.stderr
    assert "tensor_model_parallel_size=3 must divide the attention heads (32)" in proc.stderr
    proc = _dry_run("--config", "recipes/pretrain_llama32_1b.yaml", *common[:1], "checkpoint.save=/tmp/x",
                    "speechlm.blend=/nonexistent/blend.yaml")
    assert proc.returncode != 0 and "blend file not found: /nonexistent/blend.yaml" in proc.stderr
