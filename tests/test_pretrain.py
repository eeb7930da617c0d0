"""Pretraining recipe and entry point (issue 7) on CPU: 2 processes, the smoke recipe, a real blend."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_torchrun
from speechlm import checkpoints

pytestmark = pytest.mark.slow


def _losses(log: str, key: str = "lm loss") -> dict[int, float]:
    return {int(i): float(v) for i, v in re.findall(rf"iteration\s+(\d+)/\s*\d+ \|.*?\| {key}: ([0-9.E+-]+)", log)}


def _args(model, blend, ckpt, *extra):
    return ["-m", "speechlm.train", "--config", "recipes/smoke.yaml", f"speechlm.hf_model={model}",
            f"speechlm.blend={blend}", f"checkpoint.save={ckpt}", *extra]


def _tensorboard_tags(directory) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for root, _, files in os.walk(directory):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
    return tags


@pytest.fixture(scope="module")
def uninterrupted_run(expanded_tiny_dir, synthetic_blend, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    ckpt = out / "ckpt"
    rc, log = run_torchrun(2, _args(expanded_tiny_dir, synthetic_blend, ckpt, "checkpoint.save_interval=5",
                                    "speechlm.keep_last=2", "speechlm.pinned=[5]"), out / "log.txt")
    assert rc == 0, log[-4000:]
    return ckpt, log


def test_loss_falls_and_everything_is_logged(uninterrupted_run):
    ckpt, log = uninterrupted_run
    losses = _losses(log)
    assert sorted(losses) == list(range(1, 21))
    assert np.mean([losses[i] for i in (18, 19, 20)]) < np.mean([losses[i] for i in (1, 2, 3)]) - 1.0, losses
    assert _losses(log, "speech loss") and _losses(log, "text loss")  # the loss split by target kind
    assert re.search(r"tokens/s/GPU [0-9,]+ \| MFU", log)
    tags = _tensorboard_tags(ckpt.parent / "tensorboard")
    for name in ("audio/hi", "audio/ta", "tts/hi", "text/en"):  # each validation set on its own
        assert f"validation/{name} lm loss" in tags and f"validation/{name} ppl" in tags, sorted(tags)
    for tag in ("lm loss", "speech loss", "text loss", "learning-rate", "grad-norm",
                "throughput/tokens_per_sec_per_gpu", "throughput/mfu", "memory/max_allocated_gib"):
        assert tag in tags, (tag, sorted(tags))


def test_checkpoints_are_retained_by_rule_and_record_provenance(uninterrupted_run, synthetic_blend, expanded_tiny_dir):
    ckpt, _ = uninterrupted_run
    # saved at 5, 10, 15, 20; keep the last 2 plus pinned 5
    assert checkpoints.saved_iterations(ckpt) == [5, 15, 20]
    prov = json.loads((ckpt / "iter_0000020" / "provenance.json").read_text())
    from speechlm.token_layout import TokenLayout
    from speechlm.blend_file import load

    assert prov["iteration"] == 20
    assert prov["layout_hash"] == TokenLayout.load(expanded_tiny_dir).layout_hash
    assert prov["blend"]["sha256"] == load(synthetic_blend).sha256
    assert prov["packages"]["megatron-bridge"] == "0.6.2" and prov["git_commit"]
    assert prov["recipe"]["train"]["global_batch_size"] == 4


def test_retention_rule_and_schedule():
    assert checkpoints.checkpoints_to_delete([5, 10, 15, 20, 25], keep_last=2, pinned={10}) == [5, 15]
    assert checkpoints.checkpoints_to_delete([5], keep_last=5, pinned=set()) == []
    schedule = [[30000, 5000], [None, 10000]]
    assert [checkpoints.save_interval_at(i, schedule) for i in (0, 25000, 29999, 30000, 90000)] == \
        [5000, 5000, 5000, 10000, 10000]


def test_sigterm_checkpoints_and_exits_then_resume_reproduces(uninterrupted_run, expanded_tiny_dir, synthetic_blend, tmp_path):
    import psutil

    _, reference_log = uninterrupted_run
    reference = _losses(reference_log)
    ckpt = tmp_path / "ckpt"
    log_path = tmp_path / "run1.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           *_args(expanded_tiny_dir, synthetic_blend, ckpt, "checkpoint.save_interval=100")]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 400
        while not re.search(r"iteration\s+7/", log_path.read_text()):
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        # What srun does on a SLURM time limit: signal every task.
        for child in psutil.Process(proc.pid).children():
            child.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    log = log_path.read_text()
    assert rc == 0, log[-3000:]
    assert "exiting program after receiving SIGTERM" in log
    stopped_at = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 7 <= stopped_at < 20 and max(_losses(log)) == stopped_at

    rc, log2 = run_torchrun(2, _args(expanded_tiny_dir, synthetic_blend, ckpt, "checkpoint.save_interval=100"),
                            tmp_path / "run2.txt")
    assert rc == 0, log2[-3000:]
    resumed = _losses(log2)
    assert sorted(resumed) == list(range(stopped_at + 1, 21))
    # Same data order and state: the resumed run reproduces the uninterrupted one (fp32 on CPU;
    # only the order of floating-point reductions could differ).
    for i, loss in resumed.items():
        assert abs(loss - reference[i]) <= 1e-4, (i, loss, reference[i])


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
                    "checkpoint.save=/tmp/unused", "speechlm.train_tokens=10000000000")
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
