"""The foundation: Megatron-Bridge's real converters and training loop on this CPU-only machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tp", [1, 2])
def test_autobridge_roundtrip_is_exact(tiny_llama_dir, tmp_path, tp):
    """HF -> Megatron (TP=tp, gloo) -> HF with the real 128,256-token vocabulary."""
    out = tmp_path / "hf_back"
    rc, log = run_torchrun(tp, ["tests/workers/bridge_roundtrip.py", str(tiny_llama_dir), str(out)],
                           tmp_path / "log.txt")
    assert rc == 0, log[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["tp"] == tp and report["vocab_size"] == 128_256
    assert report["megatron_vs_hf"] <= 1e-5, report  # fp32; measured ~3e-7
    assert report["roundtrip_logits"] <= 1e-5, report
    assert report["same_keys"] and report["weights_identical"], report


@pytest.fixture(scope="module")
def counting_dataset(tmp_path_factory):
    """A real indexed dataset (megatron-core's builder): documents that count upwards, so the
    next token is always the previous + 1 and a model can learn it quickly."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, IndexedDataset

    prefix = str(tmp_path_factory.mktemp("data") / "counting")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    docs = []
    for _ in range(400):
        doc = (int(rng.integers(1000, 1100)) + np.arange(int(rng.integers(20, 60)))).astype(np.int32)
        builder.add_document(doc, [len(doc)])
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    written = IndexedDataset(prefix)
    assert len(written) == 400 and np.array_equal(written[7], docs[7])
    return prefix


def _losses(log: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)", log)}


def test_pretrain_two_processes_checkpoint_and_resume(tiny_llama_dir, counting_dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    common = ["-m", "speechlm.train", "--config", "recipes/smoke.yaml", f"speechlm.hf_model={tiny_llama_dir}",
              f"dataset.blend=[[{counting_dataset}],null]", "speechlm.blend=null", f"checkpoint.save={ckpt}",
              "checkpoint.save_interval=10", "dataset.split=90,5,5", "speechlm.from_scratch=true"]

    rc, log = run_torchrun(2, common + ["train.train_iters=20"], tmp_path / "run1.txt")
    assert rc == 0, log[-4000:]
    losses = _losses(log)
    assert sorted(losses) == list(range(1, 21)), losses
    assert np.mean([losses[i] for i in (18, 19, 20)]) < np.mean([losses[i] for i in (1, 2, 3)]) - 0.5, losses
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
    assert (ckpt / "iter_0000020" / ".metadata").is_file()  # torch_dist format
    assert "validation loss at iteration 20" in log

    rc, log2 = run_torchrun(2, common + ["train.train_iters=24"], tmp_path / "run2.txt")
    assert rc == 0, log2[-4000:]
    resumed = _losses(log2)
    assert sorted(resumed) == [21, 22, 23, 24], resumed  # continues at the right iteration
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "24"
    # The resumed model carries the learned weights: its loss is near where run 1 ended.
    assert resumed[21] < losses[1] - 0.5, (resumed, losses)


def test_cpu_mode_refuses_unexpected_megatron_version():
    from speechlm import cpu_compat

    with pytest.raises(cpu_compat.UnsupportedMegatronVersion, match=r"megatron-core 0\.20\.0"):
        cpu_compat.check_versions({"megatron-core": "0.20.0", "megatron-bridge": "0.6.2"})
    cpu_compat.check_versions({"megatron-core": "0.19.2", "megatron-bridge": "0.6.2"})  # the pinned pair passes

    # apply() checks before patching anything: a fresh interpreter with a different installed version.
    script = (
        "import importlib.metadata as m; real = m.version\n"
        "m.version = lambda p: '0.18.0' if p == 'megatron-core' else real(p)\n"
        "from speechlm import cpu_compat\n"
        "cpu_compat.apply()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "megatron-core 0.18.0" in proc.stderr and "megatron-core==0.19.2" in proc.stderr
    assert "torch.cuda" not in proc.stderr
